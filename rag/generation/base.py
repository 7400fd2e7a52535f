"""The generator interface behind both families (seq2seq.py, causal.py).

Both take B questions with K passages each as B*K context rows (row = b*K + k) and give
- `teacher_force(ctx, rows, targets)`: logits (N, T, V) for target tokens (N, T) under context rows (N,);
- `begin(ctx, rows)` / `advance(state, tokens)` / `reorder(state, index)`: incremental decoding with a key/value
  cache, returning next-token logits (N, V).
Targets are answer token ids without a start token, ending with EOS, padded with `pad_id`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rag.config import GeneratorConfig
from rag.precision import Placed

log = logging.getLogger(__name__)


@dataclass
class Contexts:
    """Tokenised context rows and, for seq2seq, the encoder output computed once for all of them."""

    input_ids: torch.Tensor  # (R, S)
    attention_mask: torch.Tensor  # (R, S)
    passages: list = field(default_factory=list)  # (R,) the passage of each row (None: the question alone)
    questions: list = field(default_factory=list)  # (B,) the questions, rows b*K .. b*K+K-1 being question b's
    # computed once per row: seq2seq, the encoder output (R, S, H); causal, the prompts' cache and last logits
    encoder_out: Any = None
    cross: Any = None  # seq2seq: per decoder layer, cross-attention (keys, values) of every row
    shared: int = 0  # causal: the first `shared` columns are one prefix of every row (the system prompt)


@dataclass
class DecodeState:
    rows: torch.Tensor  # (N,) context row of each decoding row
    cache: Any
    attention_mask: torch.Tensor | None = None  # causal: (N, S + steps)
    positions: torch.Tensor | None = None  # causal: (N,) next position id
    extra: dict = field(default_factory=dict)


def clean_title(title: str) -> str:
    return title[1:-1] if len(title) > 1 and title[0] == title[-1] == '"' else title


class Generator(Placed, nn.Module):
    """Common parts; subclasses fill in how contexts are built and decoded."""

    is_seq2seq: bool

    def __init__(self, model: nn.Module, tokenizer, cfg: GeneratorConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.train(model.training)
        if tokenizer.pad_token_id is None:
            # GPT-2 style tokenizers have no pad token: padding positions are masked, so EOS serves.
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.eos_id = self.eos_ids[0]  # what training targets end with
        if cfg.stop:  # stop strings end decoding like EOS; the answer text leaves them out
            texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            self.eos_ids += [i for i, t in enumerate(texts) if i not in self.eos_ids and any(s in t for s in cfg.stop)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_config(self, **changes) -> Generator:
        """The same model and tokenizer under changed settings (e.g. a longer context), leaving this one as it is."""
        import copy
        import dataclasses

        clone = copy.copy(self)  # shares the wrapped model's weights; only `cfg` differs
        clone.cfg = dataclasses.replace(self.cfg, **changes)
        return clone

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def pad(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences -> (N, T) ids padded with pad_id and an (N, T) float mask of real tokens.

        The mask comes from the lengths, not from comparing with pad_id: where pad and EOS are one token
        (GPT-2), the final EOS is still a target."""
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        lengths = torch.tensor([len(x) for x in seqs])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
        return ids.to(self.device), mask.to(self.device)

    def target_ids(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answers -> (N, T) token ids ending with EOS, padded, and their (N, T) mask."""
        return self.pad([self.tokenizer(self.answer_lead + a, add_special_tokens=False)["input_ids"]
                         [: self.cfg.max_target_length - 1] + [self.eos_id] for a in answers])

    @property
    def answer_lead(self) -> str:
        """What separates the prompt from a target answer: a space after an answer prefix such as "The answer is:",
        so that training teaches the tokens the model itself writes there (" Paris", not "Paris")."""
        prefix = self.cfg.answer_prefix
        return " " if prefix and not prefix[-1].isspace() else ""

    def target_logprobs(self, ctx: Contexts, rows: torch.Tensor, targets: torch.Tensor, vocab_sum: bool = False,
                        full: bool = False):
        """The one teacher-forcing path (training loss, answer posteriors, RAG-sequence rescoring): (N, T) targets
        under context rows (N,) -> log p(y_t | x, z, y_<t) (N, T), Σ_v log p(v | ...) (N, T) with `vocab_sum` (label
        smoothing), and the whole (N, T, V) log-softmax with `full` (RAG-token label smoothing); None when not asked."""
        from rag.generation.marginal import gather_target_logprobs

        logits = self.teacher_force(ctx, rows, targets)  # (N, T, V)
        lp, total = gather_target_logprobs(logits, targets, vocab_sum)
        return lp, total, torch.log_softmax(logits.float(), -1) if full else None

    def truncate(self, text: str) -> str:
        """The passage text as the model reads it (seq2seq: whole; its tokenizer truncates the joined input)."""
        return text

    def cut(self, text: str, limit: int) -> str:
        """`text` up to its `limit`-th token, cut in the original string (no re-spelling) at the white space before
        that token's word, so that nothing (nor an answer copied from it) ends mid-word."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= limit:
            return text
        end = offsets[limit - 1][1]
        if end < len(text) and not text[end].isspace():  # the token limit falls inside a word
            space = max(text.rfind(" ", 0, end), text.rfind("\n", 0, end))
            end = space if space > 0 else end
        return text[:end].rstrip()

    def clip_questions(self, questions: list[str]) -> list[str]:
        """Questions as the generator reads them: at most `max_question_length` tokens (one warning)."""
        out = [self.cut(q, self.cfg.max_question_length) for q in questions]
        if out != list(questions) and not self.__dict__.get("_warned_long"):
            log.warning("a question longer than generator.max_question_length=%d tokens was cut for the generator",
                        self.cfg.max_question_length)
            self.__dict__["_warned_long"] = True
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids and i != self.pad_id],
                                     skip_special_tokens=True).strip()


"""Generators behind one interface: sequence-to-sequence (BART, T5) and decoder-only causal LMs (Llama, GPT-2).

Both take B questions with K passages each as B*K context rows (row = b*K + k) and give
- `teacher_force(ctx, rows, targets)`: logits (N, T, V) for target tokens (N, T) under context rows (N,);
- `begin(ctx, rows)` / `advance(state, tokens)` / `reorder(state, index)`: incremental decoding with a key/value
  cache, returning next-token logits (N, V).
Targets are answer token ids without a start token, ending with EOS, padded with `pad_id`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rag.config import GeneratorConfig
from rag.precision import Placed
from rag.retrieval.passages import PassageRecord

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


LENGTH_SLACK = 0.15  # a row joins a length group when at most this share of its group's width is padding
GROUP_ROWS = 8  # ... or when the group has fewer rows: smaller passes cost more than their padding saves


def length_groups(lengths: torch.Tensor, slack: float = LENGTH_SLACK, min_rows: int = GROUP_ROWS) -> list[torch.Tensor]:
    """Row indices grouped by similar length, longest first: a batch of prompts of 80-210 tokens padded to the
    longest is a quarter padding, and a prompt pass costs per padded token; each group runs at its own width.
    (16 questions x 5 passages of the demo: 1.27 -> 1.15 s a question; one question's 5 rows stay one pass.)"""
    order = lengths.argsort(descending=True).tolist()
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) < min_rows or lengths[i] >= (1 - slack) * lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [torch.tensor(g, device=lengths.device) for g in groups]


def shared_prefix(ids: list[list[int]]) -> int:
    """How many leading tokens all rows have in common, leaving every row at least one of its own."""
    n, limit = 0, min(len(x) for x in ids) - 1
    while n < limit and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def by_length(mask: torch.Tensor, run, left: bool) -> list:
    """`run(rows, width)` on each length group of `mask`'s rows (trimmed to the group's width on the padded side);
    `run` returns a list of (tensor, its width dim or None); each tensor comes back padded to the full width on that
    dim (on the left or the right, as the rows are padded), the groups joined and the rows in their first order."""
    width = mask.shape[1]
    groups = length_groups(mask.sum(1), LENGTH_SLACK, GROUP_ROWS)
    if len(groups) == 1:  # one question's rows, most often: no regrouping copies
        return [t for t, _ in run(torch.arange(len(mask), device=mask.device), width)]
    parts = [run(g, int(mask[g].sum(1).max())) for g in groups]
    inverse = torch.cat(groups).argsort()
    out = []
    for j, (_, dim) in enumerate(parts[0]):
        pieces = []
        for part in parts:
            t = part[j][0]
            if dim is not None and t.shape[dim] < width:
                pad = [0, 0] * (t.dim() - 1 - dim) + ([width - t.shape[dim], 0] if left else [0, width - t.shape[dim]])
                t = torch.nn.functional.pad(t, pad)
            pieces.append(t)
        out.append(torch.cat(pieces)[inverse])
    return out


def _clean_title(title: str) -> str:
    return title[1:-1] if len(title) > 1 and title[0] == title[-1] == '"' else title


def kv_cache(module: nn.Module, cache) -> dict:
    """The key/value cache as the keyword this transformers takes: `cache` in 5.x, where `past_key_values` is
    deprecated (removal announced for 5.40); only `past_key_values` before."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # a peft model: its base's
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_of(output):
    """The key/value cache a forward pass returned (`cache` in transformers 5.x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


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


class Seq2SeqGenerator(Generator):
    """BART / T5: input "title / text // question" (the paper's format), truncated to `max_context_length` tokens."""

    is_seq2seq = True

    @property
    def forced_bos(self) -> int | None:
        """BART's forced first token (transformers' `forced_bos_token_id`): decoding forces it, scoring ignores it."""
        return getattr(self.model.config, "forced_bos_token_id", None)

    def __init__(self, model, tokenizer, cfg):
        super().__init__(model, tokenizer, cfg)
        self.start_id = int(model.config.decoder_start_token_id if model.config.decoder_start_token_id is not None
                            else self.pad_id)

    def context_texts(self, questions: list[str], passages: list[list[PassageRecord | None]]) -> list[str]:
        prefix = getattr(self.model.config, "prefix", None) or ""
        return [(prefix + (q if p is None else _clean_title(p.title) + " / " + p.text + " // " + q)).replace("  ", " ")
                for q, ps in zip(questions, passages, strict=True) for p in ps]  # None: the question alone

    def prepare(self, questions: list[str], passages: list[list[PassageRecord | None]]) -> Contexts:
        questions = self.clip_questions(questions)
        enc = self.tokenizer(self.context_texts(questions, passages), max_length=self.cfg.max_context_length,
                             truncation=True, padding=True, return_tensors="pt").to(self.device)
        return Contexts(enc["input_ids"], enc["attention_mask"], [p for ps in passages for p in ps], list(questions))

    def encode(self, ctx: Contexts) -> torch.Tensor:
        """The encoder runs once per context row; every beam and hypothesis reuses its output."""
        if ctx.encoder_out is None:
            encoder = self.model.get_encoder()

            def run(rows, width):  # right padding: a row's tokens are its first `width` columns
                out = encoder(input_ids=ctx.input_ids[rows, :width], attention_mask=ctx.attention_mask[rows, :width])
                return [(out.last_hidden_state, 1)]

            ctx.encoder_out = by_length(ctx.attention_mask, run, left=False)[0]
        return ctx.encoder_out

    def _decoder(self, encoder_out, decoder_input_ids: torch.Tensor, cache=None, use_cache: bool = False):
        hidden, mask = encoder_out
        return self.model(encoder_outputs=hidden, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                          **kv_cache(self.model, cache), use_cache=use_cache)

    def _rows(self, ctx: Contexts, rows: torch.Tensor):
        """Encoder output and mask of the given rows (gathered once per decoding, not per step)."""
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.encode(ctx)[rows]), ctx.attention_mask[rows]

    def _cache(self, ctx: Contexts, rows: torch.Tensor):
        """A decoder cache whose cross-attention keys/values are already filled for `rows`.

        Cross-attention keys/values depend on the passage alone, so they are projected once per context row and
        gathered for every beam and scored hypothesis instead of being projected again for each of them."""
        from transformers import DynamicCache, EncoderDecoderCache

        if ctx.cross is None:  # one decoder step (no LM head) over every context row fills the cross-attention
            start = torch.full((len(ctx.input_ids), 1), self.start_id, dtype=torch.long, device=self.device)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            decoder = self.model.get_decoder()
            decoder(input_ids=start, encoder_hidden_states=self.encode(ctx), encoder_attention_mask=ctx.attention_mask,
                    **kv_cache(decoder, cache), use_cache=True)
            self._keep_cross(ctx, cache)
        return EncoderDecoderCache(DynamicCache(), DynamicCache(ddp_cache_data=[(k[rows], v[rows])
                                                                                for k, v in ctx.cross]))

    @staticmethod
    def _keep_cross(ctx: Contexts, cache) -> None:
        ctx.cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]

    def teacher_force(self, ctx: Contexts, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        start = torch.full((len(rows), 1), self.start_id, dtype=torch.long, device=targets.device)
        decoder_in = torch.cat([start, targets[:, :-1]], 1)  # (N, T): shift right
        if ctx.cross is None and torch.equal(rows, torch.arange(len(ctx.input_ids), device=rows.device)):
            # each row once (training): no gathered copies, no cross-attention cache kept beside the graph
            from transformers.modeling_outputs import BaseModelOutput

            every = BaseModelOutput(last_hidden_state=self.encode(ctx)), ctx.attention_mask
            return self._decoder(every, decoder_in).logits  # (N, T, V)
        return self._decoder(self._rows(ctx, rows), decoder_in, cache=self._cache(ctx, rows),
                             use_cache=True).logits

    def begin(self, ctx: Contexts, rows: torch.Tensor) -> tuple[DecodeState, torch.Tensor]:
        start = torch.full((len(rows), 1), self.start_id, dtype=torch.long, device=self.device)
        encoder_out = self._rows(ctx, rows)
        every_row_once = ctx.cross is None and torch.equal(rows, torch.arange(len(ctx.input_ids), device=rows.device))
        if every_row_once:  # greedy: the first step itself projects each row's cross-attention once
            from transformers import DynamicCache, EncoderDecoderCache

            out = self._decoder(encoder_out, start, cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                                use_cache=True)
            self._keep_cross(ctx, cache_of(out))
        else:
            out = self._decoder(encoder_out, start, cache=self._cache(ctx, rows), use_cache=True)
        return DecodeState(rows=rows, cache=cache_of(out), extra={"encoder_out": encoder_out}), \
            out.logits[:, -1]

    def advance(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        out = self._decoder(state.extra["encoder_out"], tokens[:, None], cache=state.cache, use_cache=True)
        state.cache = cache_of(out)
        return out.logits[:, -1]

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        """Select decoding rows. Beams moved by `index` keep their context row, so the cross-attention cache (a
        function of the context alone) is left as it is; rows dropped (finished questions) take it along."""
        cache = state.cache
        if torch.equal(state.rows[index], state.rows):
            getattr(cache, "self_attention_cache", cache).reorder_cache(index)
            return
        cache.reorder_cache(index)
        from transformers.modeling_outputs import BaseModelOutput

        hidden, mask = state.extra["encoder_out"]
        state.extra["encoder_out"] = (BaseModelOutput(last_hidden_state=hidden.last_hidden_state[index]), mask[index])
        state.rows = state.rows[index]


class CausalGenerator(Generator):
    """Decoder-only LMs: passage and question in a prompt (the chat template where the tokenizer has one)."""

    is_seq2seq = False
    forced_bos = None

    def __init__(self, model, tokenizer, cfg):
        super().__init__(model, tokenizer, cfg)
        self.use_chat = cfg.chat_template and getattr(tokenizer, "chat_template", None) is not None
        import inspect

        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if cfg.chat_template and not self.use_chat:
            log.warning("tokenizer of %s has no chat template; using the plain prompt template", cfg.name)

    def truncate(self, text: str) -> str:
        """The passage text up to `max_context_length` tokens, ending where a word ends (see `cut`)."""
        return self.cut(text, self.cfg.max_context_length)

    def prompt(self, question: str, passage: PassageRecord | None) -> str:
        if passage is None:
            user = self.cfg.closed_book_template.format(question=question)
        else:
            text = self.truncate(passage.text)
            user = self.cfg.prompt_template.format(title=_clean_title(passage.title), text=text, question=question)
        if not self.use_chat:
            return user + self.cfg.answer_prefix
        messages = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else [])
        messages.append({"role": "user", "content": user})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + \
            self.cfg.answer_prefix

    def prepare(self, questions: list[str], passages: list[list[PassageRecord | None]]) -> Contexts:
        questions = self.clip_questions(questions)
        texts = [self.prompt(q, p) for q, ps in zip(questions, passages, strict=True) for p in ps]
        ids = [self.tokenizer(t, add_special_tokens=not self.use_chat)["input_ids"] for t in texts]
        # [shared prefix | left padding | the rest]: every prompt ends where the answer starts, and the prefix
        # every row begins with (chat header and system prompt, 19 of ~160 tokens in the demo) is run once for a
        # batch; not for one question's few rows, where the extra pass costs what it saves
        shared = shared_prefix(ids) if len(ids) >= GROUP_ROWS else 0
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        input_ids[:, :shared] = torch.tensor(ids[0][:shared])
        mask[:, :shared] = 1
        for i, x in enumerate(ids):
            input_ids[i, width - len(x) + shared:] = torch.tensor(x[shared:])
            mask[i, width - len(x) + shared:] = 1
        return Contexts(input_ids.to(self.device), mask.to(self.device), [p for ps in passages for p in ps],
                        list(questions), shared=shared)

    def _forward(self, input_ids, mask, positions, cache=None, last_only: bool = False):
        extra = {}
        if last_only and self._keeps_logits:
            # an index, not `1`: the slice h[:, -1:] is not contiguous, and torch's matmul then multiplies it by
            # the LM head weight expanded and copied per row whenever that weight does not require grad (as after
            # an adapter merge): 330 ms instead of 4 ms per prompt batch for SmolLM2's 49k x 576 head
            extra = {"logits_to_keep": torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)}
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          **kv_cache(self.model, cache), use_cache=cache is not None or None, **extra)

    def _prefix(self, ctx: Contexts) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Key/value cache and last-position logits of every prompt, computed once per context row and reused by
        every decoding row and every scored hypothesis (the decoder-only analogue of the encoder output)."""
        if ctx.encoder_out is None:
            from transformers import DynamicCache

            P = ctx.shared
            head = []  # per layer, keys and values of the shared prefix, (1, heads, P, dim)
            if P:
                ones = ctx.attention_mask[:1, :P]
                out = self._forward(ctx.input_ids[:1, :P], ones, ones.cumsum(1) - 1, DynamicCache())
                head = [t for layer in cache_of(out).layers for t in (layer.keys, layer.values)]

            def run(rows, width):  # left padding: a row's own tokens are its last `width` columns
                mask = torch.cat([ctx.attention_mask[rows, :P], ctx.attention_mask[rows, -width:]], 1)
                positions = (mask.cumsum(1) - 1).clamp(min=0)[:, P:]
                cache = DynamicCache(ddp_cache_data=[(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                                     for k, v in zip(head[0::2], head[1::2], strict=True)] or None)
                # only the last prompt position's logits are needed: no (R, S, V) LM-head output for the prompts
                out = self._forward(ctx.input_ids[rows, -width:], mask, positions, cache, last_only=True)
                layers = cache_of(out).layers
                return [(out.logits[:, -1], None)] + [(t[:, :, P:], 2) for layer in layers
                                                      for t in (layer.keys, layer.values)]

            last, *kv = by_length(ctx.attention_mask[:, P:], run, left=True)
            if P:
                kv = [torch.cat([h.expand(len(t), -1, -1, -1), t], 2) for h, t in zip(head, kv, strict=True)]
            ctx.encoder_out = (list(zip(kv[0::2], kv[1::2], strict=True)), last)
        return ctx.encoder_out

    def _cache_for(self, ctx: Contexts, rows: torch.Tensor):
        from transformers import DynamicCache

        kv, _ = self._prefix(ctx)
        return DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in kv])

    def teacher_force(self, ctx: Contexts, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, last = self._prefix(ctx)
        if targets.shape[1] == 1:
            return last[rows][:, None]
        mask = torch.cat([ctx.attention_mask[rows], torch.ones_like(targets)], 1)  # (N, S + T)
        start = ctx.attention_mask[rows].sum(1, keepdim=True)  # (N, 1) first answer position
        positions = start + torch.arange(targets.shape[1], device=targets.device)[None, :]
        logits = self._forward(targets[:, :-1], mask[:, :-1], positions[:, :-1], self._cache_for(ctx, rows)).logits
        return torch.cat([last[rows][:, None], logits], 1)  # (N, T, V): the prompt's last logits predict token 0

    def begin(self, ctx: Contexts, rows: torch.Tensor) -> tuple[DecodeState, torch.Tensor]:
        _, last = self._prefix(ctx)
        mask = ctx.attention_mask[rows]
        state = DecodeState(rows=rows, cache=self._cache_for(ctx, rows), attention_mask=mask,
                            positions=mask.sum(1))
        return state, last[rows]

    def advance(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], 1)
        out = self._forward(tokens[:, None], state.attention_mask, state.positions[:, None], state.cache)
        state.cache = cache_of(out)
        state.positions = state.positions + 1
        return out.logits[:, -1]

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        state.cache.reorder_cache(index)
        state.attention_mask = state.attention_mask[index]
        state.positions = state.positions[index]
        state.rows = state.rows[index]


def load_generator(cfg: GeneratorConfig) -> Generator:
    """Load `cfg.name` (hub name, folder, or an offline package's GGUF, see rag.weights) as the right family."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from rag.weights import load_causal_lm, loading, resolve

    # an offline package's GGUF first: it is a causal LM, and asking the hub for its config fails offline
    model, tokenizer = load_causal_lm(cfg.name) if cfg.family != "seq2seq" else (None, None)
    seq2seq = False
    if model is None:
        path = resolve(cfg.name)
        with loading("generator.name", cfg.name):
            seq2seq = cfg.family == "seq2seq" or (cfg.family == "auto"
                                                  and AutoConfig.from_pretrained(path).is_encoder_decoder)
            tokenizer = AutoTokenizer.from_pretrained(path)
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = auto.from_pretrained(path, dtype=torch.float32)
    if cfg.adapter:
        from rag.adapters import merge_adapter

        model = merge_adapter(model, cfg.adapter, "generator.adapter")
    return (Seq2SeqGenerator if seq2seq else CausalGenerator)(model.eval(), tokenizer, cfg)

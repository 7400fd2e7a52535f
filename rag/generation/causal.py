"""Decoder-only causal generators (Llama, GPT-2): a chat prompt per context row, its shared prefix computed once."""

from __future__ import annotations

import inspect
import logging

import torch

from rag.generation import batching
from rag.generation.base import Contexts, DecodeState, Generator, clean_title
from rag.retrieval.passages import PassageRecord

log = logging.getLogger(__name__)


class CausalGenerator(Generator):
    """Decoder-only LMs: passage and question in a prompt (the chat template where the tokenizer has one)."""

    is_seq2seq = False
    forced_bos = None

    def __init__(self, model, tokenizer, cfg):
        super().__init__(model, tokenizer, cfg)
        self.use_chat = cfg.chat_template and getattr(tokenizer, "chat_template", None) is not None

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
            user = self.cfg.prompt_template.format(title=clean_title(passage.title), text=text, question=question)
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
        shared = batching.shared_prefix(ids) if len(ids) >= batching.GROUP_ROWS else 0
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
                          **batching.kv_cache(self.model, cache), use_cache=cache is not None or None, **extra)

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
                head = [t for layer in batching.cache_of(out).layers for t in (layer.keys, layer.values)]

            def run(rows, width):  # left padding: a row's own tokens are its last `width` columns
                mask = torch.cat([ctx.attention_mask[rows, :P], ctx.attention_mask[rows, -width:]], 1)
                positions = (mask.cumsum(1) - 1).clamp(min=0)[:, P:]
                cache = DynamicCache(ddp_cache_data=[(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                                                     for k, v in zip(head[0::2], head[1::2], strict=True)] or None)
                # only the last prompt position's logits are needed: no (R, S, V) LM-head output for the prompts
                out = self._forward(ctx.input_ids[rows, -width:], mask, positions, cache, last_only=True)
                layers = batching.cache_of(out).layers
                return [(out.logits[:, -1], None)] + [(t[:, :, P:], 2) for layer in layers
                                                      for t in (layer.keys, layer.values)]

            last, *kv = batching.by_length(ctx.attention_mask[:, P:], run, left=True)
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
        state.cache = batching.cache_of(out)
        state.positions = state.positions + 1
        return out.logits[:, -1]

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        state.cache.reorder_cache(index)
        state.attention_mask = state.attention_mask[index]
        state.positions = state.positions[index]
        state.rows = state.rows[index]


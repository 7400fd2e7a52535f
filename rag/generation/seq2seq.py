"""Sequence-to-sequence generators (BART, T5): the encoder runs once per context row, the decoder per step."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput

from rag.generation import batching
from rag.generation.base import Contexts, DecodeState, Generator, clean_title
from rag.retrieval.passages import PassageRecord


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
        return [(prefix + (q if p is None else clean_title(p.title) + " / " + p.text + " // " + q)).replace("  ", " ")
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

            ctx.encoder_out = batching.by_length(ctx.attention_mask, run, left=False)[0]
        return ctx.encoder_out

    def _decoder(self, encoder_out, decoder_input_ids: torch.Tensor, cache=None, use_cache: bool = False):
        hidden, mask = encoder_out
        return self.model(encoder_outputs=hidden, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                          **batching.kv_cache(self.model, cache), use_cache=use_cache)

    def _rows(self, ctx: Contexts, rows: torch.Tensor):
        """Encoder output and mask of the given rows (gathered once per decoding, not per step)."""

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
                    **batching.kv_cache(decoder, cache), use_cache=True)
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
            self._keep_cross(ctx, batching.cache_of(out))
        else:
            out = self._decoder(encoder_out, start, cache=self._cache(ctx, rows), use_cache=True)
        return DecodeState(rows=rows, cache=batching.cache_of(out), extra={"encoder_out": encoder_out}), \
            out.logits[:, -1]

    def advance(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        out = self._decoder(state.extra["encoder_out"], tokens[:, None], cache=state.cache, use_cache=True)
        state.cache = batching.cache_of(out)
        return out.logits[:, -1]

    def reorder(self, state: DecodeState, index: torch.Tensor) -> None:
        """Select decoding rows. Beams moved by `index` keep their context row, so the cross-attention cache (a
        function of the context alone) is left as it is; rows dropped (finished questions) take it along."""
        cache = state.cache
        if torch.equal(state.rows[index], state.rows):
            getattr(cache, "self_attention_cache", cache).reorder_cache(index)
            return
        cache.reorder_cache(index)

        hidden, mask = state.extra["encoder_out"]
        state.extra["encoder_out"] = (BaseModelOutput(last_hidden_state=hidden.last_hidden_state[index]), mask[index])
        state.rows = state.rows[index]


"""BERT-style encoders with pooling, for BERT_d (frozen, indexes passages) and BERT_q (trainable, encodes questions)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rag.config import ConfigError, EncoderConfig
from rag.precision import Placed, resolve_device  # noqa: F401 - resolve_device importable from here

log = logging.getLogger(__name__)

def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of the parameters: two encoders with the same fingerprint give the same vectors."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def encoder_record(cfg: EncoderConfig) -> dict:
    """What an index's manifest records of the encoder that made its vectors (the builder adds the weights'
    fingerprint and the dimension); a query encoder left unset in a RAG config is rebuilt from it."""
    return {"name": cfg.name, "pooling": cfg.pooling, "normalize": cfg.normalize, "max_length": cfg.max_length,
            "title": cfg.title, "query_prefix": cfg.query_prefix, "passage_prefix": cfg.passage_prefix}


class Encoder(Placed, nn.Module):
    """A transformers encoder with pooling: `forward` is differentiable, `encode` is batched inference."""

    def __init__(self, model: nn.Module, tokenizer, cfg: EncoderConfig):
        super().__init__()
        if cfg.pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise ConfigError(f"encoder {cfg.name}: pooling 'pooler' needs a model with a pooler layer")
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fingerprint = weights_fingerprint(model)
        # never longer than the model has position embeddings for
        self.max_length = min(cfg.max_length, getattr(model.config, "max_position_embeddings", cfg.max_length))
        self.train(model.training)  # follow the wrapped model (eval after from_pretrained), not nn.Module's default

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> Encoder:
        """Load `cfg.name` (a hub name or a local folder) with `AutoModel` / `AutoTokenizer`."""
        from transformers import AutoModel, AutoTokenizer

        from rag.weights import loading, resolve

        path = resolve(cfg.name)
        with loading("encoder.name", cfg.name):
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        whole = None  # a DPR checkpoint, kept so that save_pretrained writes what AutoModel reads back
        if hasattr(model, "question_encoder") or hasattr(model, "ctx_encoder"):
            # DPR checkpoints wrap a BertModel without a pooler layer: the DPR embedding is its [CLS] vector.
            if getattr(model.config, "projection_dim", 0):
                raise ConfigError(f"encoder {cfg.name}: DPR with projection_dim > 0 is not supported")
            if cfg.pooling != "cls":
                raise ConfigError(f"encoder {cfg.name}: DPR's embedding is its [CLS] vector; set pooling: cls "
                                  f"(not {cfg.pooling})")
            whole = model
            model = getattr(model, "question_encoder", None) or model.ctx_encoder
            model = getattr(model, "bert_model", model)
        if cfg.adapter:
            from rag.weights import merge_adapter

            model = merge_adapter(model, cfg.adapter, "query_encoder.adapter")
        enc = cls(model, tokenizer, cfg)
        if whole is not None:
            enc.__dict__["whole"] = whole  # not a submodule: its weights are `model`'s
        return enc.place(cfg.device, cfg.precision)

    def identity(self) -> dict:
        """The keys `rag.retrieval.index_folder.check_encoder` compares with an index's encoder record."""
        return {**encoder_record(self.cfg), "fingerprint": self.fingerprint, "dim": self.dim}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _segments(self, texts: Sequence[str], titles: Sequence[str] | None, query: bool):
        first, second = list(texts), None
        if titles is not None and self.cfg.title == "prefix":
            first = [f"{t}. {x}" if t else x for t, x in zip(titles, texts, strict=True)]
        elif titles is not None and self.cfg.title == "pair":
            first, second = list(titles), list(texts)
        prefix = self.cfg.query_prefix if query else self.cfg.passage_prefix
        return ([prefix + x for x in first] if prefix else first), second

    def token_counts(self, texts: Sequence[str], query: bool = False) -> list[int]:
        """How many tokens each text (a question with `query`) has before truncation to `max_length`."""
        first, second = self._segments(texts, None, query)
        return [len(x) for x in self.tokenizer(first, second)["input_ids"]]

    def tokenize(self, texts: Sequence[str], titles: Sequence[str] | None = None, padding: bool = True,
                 query: bool = False) -> dict:
        """Token ids of passages (with their titles as `cfg.title` says), or of questions with `query`."""
        first, second = self._segments(texts, titles, query)
        return self.tokenizer(
            first,
            second,
            truncation="only_second" if second is not None else True,
            max_length=self.max_length,
            padding=padding,
            return_tensors="pt" if padding else None,
        )

    def _token_arrays(self, texts, titles, chunk: int = 4096):
        """Token ids (and type ids) per text as small int32 arrays: the tokenizer's own per-text objects are
        dropped chunk by chunk, which keeps a 50k-passage shard to tens of MB instead of a GB."""
        ids: list[np.ndarray] = []
        types: list[np.ndarray] | None = []
        for s in range(0, len(texts), chunk):
            enc = self.tokenize(texts[s : s + chunk], None if titles is None else titles[s : s + chunk],
                                padding=False)
            ids += [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
            if "token_type_ids" in enc and types is not None:
                types += [np.asarray(x, dtype=np.int32) for x in enc["token_type_ids"]]
            else:
                types = None
        return ids, types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        """(B, T) token ids -> (B, D) pooled embeddings, float32 whatever the compute precision."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        if self.cfg.pooling == "pooler":
            pooled = out.pooler_output.float()
        elif self.cfg.pooling == "cls":
            pooled = out.last_hidden_state[:, 0].float()
        else:
            hidden = out.last_hidden_state.float()  # (B, T, D): the mean is taken in float32
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.cfg.normalize:
            pooled = nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.float()

    def encode(
        self,
        texts: Sequence[str],
        titles: Sequence[str] | None = None,
        batch_size: int | None = None,
        progress: bool | str = False,
    ) -> np.ndarray:
        """(N,) texts -> (N, D) float32 vectors, in the input order.

        Sorting by token length before batching leaves almost no padding, so the matmuls do real work only.
        """
        batch_size = batch_size or self.cfg.batch_size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not len(texts):
            return out
        ids, types = self._token_arrays(texts, titles)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: the peak memory shows at once
        pad = self.tokenizer.pad_token_id or 0
        bar = tqdm(
            total=len(texts), unit="passage", disable=not progress, desc=progress if isinstance(progress, str) else None
        )
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            start = 0
            while start < len(order):
                width = int(lengths[order[start]])
                rows = order[start : start + max(1, min(batch_size, self.cfg.batch_tokens // width))]
                start += len(rows)
                input_ids = np.full((len(rows), width), pad, dtype=np.int64)  # (B, T)
                mask = np.zeros((len(rows), width), dtype=np.int64)  # (B, T)
                token_types = np.zeros((len(rows), width), dtype=np.int64) if types is not None else None
                for r, i in enumerate(rows):
                    n = lengths[i]
                    input_ids[r, :n] = ids[i]
                    mask[r, :n] = 1
                    if token_types is not None:
                        token_types[r, :n] = types[i]
                extra = {"token_type_ids": torch.from_numpy(token_types).to(self.device)} if types is not None else {}
                vecs = self(torch.from_numpy(input_ids).to(self.device), torch.from_numpy(mask).to(self.device),
                            **extra)
                out[rows] = vecs.cpu().numpy()
                bar.update(len(rows))
        bar.close()
        self.train(was_training)
        return out

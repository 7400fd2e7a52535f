"""Few-shot machine translation of questions with a local causal LM: between English and Polish, Russian or
Portuguese, one line per question, greedy.

Two users: `eval.translate` (translate-train: training questions into another language) and the retriever's
`query_translation` (translate-test: a question asked in Polish is searched as itself plus its English translation,
so that BM25 and the encoder see the English words the passages use). The examples below were written for this file;
none is an evaluation question. A 270M base model translates noisily (wh-words especially); names, titles and
numbers mostly survive, which is what retrieval needs.
"""

from __future__ import annotations

from rag.errors import ConfigError

SHOTS = {  # (English, translation): questions written for this file, in NQ's lower-case style
    "pl": [("who wrote the novel the lord of the rings", "kto napisał powieść władca pierścieni"),
           ("when did the first world war start", "kiedy wybuchła pierwsza wojna światowa"),
           ("what is the largest city in australia", "jakie jest największe miasto w australii"),
           ("how many players are on a football team", "ilu zawodników jest w drużynie piłkarskiej"),
           ("where was albert einstein born", "gdzie urodził się albert einstein"),
           ("who plays harry potter in the movies", "kto gra harry'ego pottera w filmach")],
    "ru": [("who wrote the novel the lord of the rings", "кто написал роман властелин колец"),
           ("when did the first world war start", "когда началась первая мировая война"),
           ("what is the largest city in australia", "какой самый большой город в австралии"),
           ("how many players are on a football team", "сколько игроков в футбольной команде"),
           ("where was albert einstein born", "где родился альберт эйнштейн"),
           ("who plays harry potter in the movies", "кто играет гарри поттера в фильмах")],
    "pt": [("who wrote the novel the lord of the rings", "quem escreveu o romance o senhor dos anéis"),
           ("when did the first world war start", "quando começou a primeira guerra mundial"),
           ("what is the largest city in australia", "qual é a maior cidade da austrália"),
           ("how many players are on a football team", "quantos jogadores há em um time de futebol"),
           ("where was albert einstein born", "onde nasceu albert einstein"),
           ("who plays harry potter in the movies", "quem interpreta harry potter nos filmes")],
}
NAMES = {"en": "English", "pl": "Polish", "ru": "Russian", "pt": "Portuguese"}


def prompt(question: str, src: str, dst: str) -> str:
    """Few-shot prompt from `src` to `dst`, one of them English: the shots read in either direction."""
    other = dst if src == "en" else src
    pairs = [(e, t) if src == "en" else (t, e) for e, t in SHOTS[other]]
    shots = "".join(f"{NAMES[src]}: {a}\n{NAMES[dst]}: {b}\n\n" for a, b in pairs)
    return f"{shots}{NAMES[src]}: {question}\n{NAMES[dst]}:"


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def check_pair(src: str, dst: str, key: str = "--from/--to") -> None:
    """One side English, the other a language with examples, else a one-line error listing them."""
    for lang in (src, dst):
        if lang not in NAMES:
            raise ConfigError(f"{key}: {lang!r} has no few-shot examples; known: {', '.join(NAMES)}")
    if (src == "en") == (dst == "en"):
        raise ConfigError(f"{key}: {src} to {dst}: one side must be English (the examples are pairs with it)")


class Translator:
    """`translator(texts)` -> their translations from `src` to `dst`, by `model` (a GGUF package name, a hub name or
    a folder), loaded on first use on `device` in the dtype of `precision`; `keys` name the settings of the language
    pair and of the model in errors."""

    def __init__(self, src: str, dst: str = "en", model: str = "google/gemma-3-270m", device: str = "cpu",
                 precision: str = "auto", max_new_tokens: int = 48, keys: tuple[str, str] = ("--from/--to", "--model")):
        check_pair(src, dst, keys[0])
        self.model_key = keys[1]
        self.src, self.dst, self.name, self.max_new_tokens = src, dst, model, max_new_tokens
        self.device, self.precision = device, precision  # resolved on first use, as rag.precision's Placed does
        self._model = self._tok = self._stops = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from rag.precision import resolve_device, resolve_precision
            from rag.weights import load_causal_lm, loading, resolve

            model, tok = load_causal_lm(self.name, self.model_key)
            if model is None:
                with loading(self.model_key, self.name):
                    path = resolve(self.name)
                    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self.device = resolve_device(self.device)
            self._model = model.to(device=self.device, dtype=resolve_precision(self.precision, self.device)).eval()
            self._tok = tok
            # end of text or of the line: the answer is one line, and the model would go on to the next example
            newline = tok("\n", add_special_tokens=False).input_ids
            self._stops = [tok.eos_token_id] + (newline if len(newline) == 1 else [])
        return self._model, self._tok

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        model, tok = self._load()
        enc = tok([prompt(t, self.src, self.dst) for t in texts], return_tensors="pt", padding=True).to(self.device)
        longest = max(map(len, tok(texts).input_ids))
        with torch.inference_mode():
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],  # no token types
                                 max_new_tokens=min(2 * longest + 8, self.max_new_tokens), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=self._stops)
        return [first_line(t) for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

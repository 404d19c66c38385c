"""T5 text encoder (transformers' `T5EncoderModel`) behind one small interface.

All three models condition on T5-v1.1-XXL's last hidden state (D = 4096):

* Open-Sora 1.2: max_length 300, the full padded sequence plus its mask (STDiT3 drops the padding
  itself from the mask).
* Latte-1: max_length 120; Open-Sora-Plan v1.1: max_length 300. Both keep only the real tokens of
  the prompt (`mask_feature`): encode padded to max_length, then cut to the prompt's real token
  count, and cut the negative prompt's PADDED encoding to that same length:

      emb, mask = enc.encode([prompt], trim=True)          # (1, L, D), L = real tokens
      neg, neg_mask = enc.encode([negative_prompt])         # (1, max_length, D)
      neg, neg_mask = neg[:, : emb.shape[1]], neg_mask[:, : emb.shape[1]]

  (encoding padded and then slicing is what the official pipelines do; the outputs at real tokens do
  not depend on the padding, the outputs at pad positions are whatever T5 computes there).

`TextEncoder.random("tiny")` is a 2-layer T5 with transformers' byte-level `ByT5Tokenizer` (no files), with
weights drawn from a fixed seed, so every process (every rank of a DSP group, every test) builds the
very same encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

# A T5-v1.1-shaped config (gated-GELU FFN, untied head, relative position buckets), just small.
TINY_T5_CONFIG = dict(
    vocab_size=384,  # ByT5Tokenizer: 3 specials + 256 bytes + 125 extra ids
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=False,
    use_cache=False,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# The `-small` models' T5, trained with them (`python -m pab.train`) on a word-level vocabulary.
SMALL_T5_CONFIG = dict(TINY_T5_CONFIG, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4)

# T5-v1.1-XXL's encoder (DeepFloyd/t5-v1_1-xxl): the shapes and cost of the real one, for full-size
# runs without a checkpoint (benchmarks).
XXL_T5_CONFIG = dict(
    TINY_T5_CONFIG, vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64
)  # fmt: skip

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json")

# Random-weight encoders by size: (config, default max_length, drawn on the CPU). The tiny one is drawn on the
# CPU so every device gets the very same weights; XXL's 19 GB of float32 would be slow to draw there.
RANDOM_SIZES: dict[str, tuple[dict, int, bool]] = {
    "tiny": (TINY_T5_CONFIG, 64, True),
    "xxl": (XXL_T5_CONFIG, 300, False),
}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


class TextEncoder(nn.Module):
    """Tokenizer + T5 encoder: prompts -> (embeddings (B, L, D), mask (B, L) int64)."""

    def __init__(self, model: T5EncoderModel, tokenizer, max_length: int) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    def token_count(self, text: str) -> int:
        """Tokens of `text` with its end token, uncut: more than `max_length` and the encoder reads only the first."""
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer_path: str | Path | None = None,
    ) -> TextEncoder:
        """Load a local T5 encoder folder (config.json + weights [+ tokenizer files]). Never downloads.

        `path` is the T5 folder (e.g. `t5-v1_1-xxl/`, or a diffusers pipeline's `text_encoder/`).
        The tokenizer is read from `tokenizer_path` if given, else from `path` if it has tokenizer
        files, else from a sibling `tokenizer/` folder (the diffusers pipeline layout of Latte-1).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a T5 checkpoint folder (no config.json)")
        if tokenizer_path is None:
            tokenizer_path = path if _has_tokenizer(path) else path.parent / "tokenizer"
        tokenizer_path = Path(tokenizer_path)
        if not _has_tokenizer(tokenizer_path):
            raise FileNotFoundError(
                f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tokenizer_path}; pass tokenizer_path="
            )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        return cls(model.to(device), tokenizer, max_length)

    @classmethod
    def random(
        cls,
        size: str = "tiny",
        max_length: int | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """A T5 encoder with random weights and the byte-level tokenizer (no files); the same seed gives the same
        weights. "tiny": d_model 64, 2 layers. "xxl": T5-v1.1-XXL's encoder (4.7B parameters), whose
        32,128-entry vocabulary holds the tokenizer's ids. `max_length` defaults to the size's (64 / 300)."""
        if size not in RANDOM_SIZES:
            raise ValueError(f"size={size!r}; the random text encoders are {sorted(RANDOM_SIZES)}")
        config, default_length, on_cpu = RANDOM_SIZES[size]
        draw = torch.device("cpu" if on_cpu else device)
        with torch.random.fork_rng(devices=[draw] if draw.type == "cuda" else []), draw:  # caller's RNG untouched
            torch.manual_seed(seed)
            model = T5EncoderModel(T5Config(**config))
        return cls(model.to(device=device, dtype=dtype), ByT5Tokenizer(), max_length or default_length)

    # ------------------------------------------------------------------ encoding

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded to max_length, truncated to max_length (EOS kept)."""
        if isinstance(prompts, str):
            raise TypeError("encode/tokenize take a list of prompts, not a single string")
        tok = self.tokenizer(
            list(prompts),
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tok["input_ids"].long(), tok["attention_mask"].long()

    @torch.no_grad()
    def encode(self, prompts: list[str], trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `prompts`.

        Returns:
            emb: (B, L, D) last hidden state in the encoder's dtype, on its device.
            mask: (B, L) int64, 1 for real tokens (incl. EOS), 0 for padding.
            L = max_length, or with `trim=True` the largest real-token count in the batch (the
            Latte / Open-Sora-Plan `mask_feature` cut; see the module docstring for negatives).
        """
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if trim:
            keep = max(int(mask.sum(dim=1).max()), 1)
            emb, mask = emb[:, :keep], mask[:, :keep]
        return emb, mask


def word_tokenizer(words: list[str]):
    """A T5-style word-level tokenizer over `words` (lower-cased, split on spaces and punctuation), built
    without any download: ids 0, 1, 2 are <pad>, </s>, <unk>; every text ends with </s>. `save_pretrained`
    writes files that `AutoTokenizer.from_pretrained` (and so `TextEncoder.from_pretrained`) reads back."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "score: 6.5." -> score : 6 . 5 .
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


__all__ = ["TextEncoder", "TINY_T5_CONFIG", "SMALL_T5_CONFIG", "word_tokenizer"]

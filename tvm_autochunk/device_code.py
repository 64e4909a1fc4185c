"""What CUDA device code an exported library carries, read from its bytes: no TVM, no CUDA,
no loading (``device_code``; ``fatbin_entries`` parses the fatbins)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190
_FATBIN_KINDS = {1: "ptx", 2: "elf"}


def fatbin_entries(data: bytes) -> list[dict]:
    """The CUDA fatbins embedded in ``data`` (an exported library), one dict per fatbin.

    Each: ``offset``, ``size`` and ``entries``, a list of ``{"kind": "elf" | "ptx", "arch":
    "sm_90", "size": n}``; for ``elf`` entries (SASS) also ``machine`` (190, EM_CUDA) and
    ``elf_arch``, the arch the cubin's own ELF header names. Pure Python: no TVM, no CUDA.
    """
    found = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    i = data.find(magic)
    while i >= 0:
        fat = _parse_fatbin(data, i)
        if fat is not None:
            found.append(fat)
            i = data.find(magic, i + fat["size"])
        else:
            i = data.find(magic, i + 4)
    return found


def _parse_fatbin(data: bytes, start: int) -> dict | None:
    try:
        _magic, version, hsize, fsize = struct.unpack_from("<IHHQ", data, start)
        if version != 1 or hsize < 16 or start + hsize + fsize > len(data):
            return None
        entries, off, end = [], start + hsize, start + hsize + fsize
        while off < end:
            kind, _ver, ehsize, padded = struct.unpack_from("<HHIQ", data, off)
            (sm,) = struct.unpack_from("<I", data, off + 28)
            if ehsize < 32 or off + ehsize + padded > end:
                return None
            payload = data[off + ehsize : off + ehsize + padded]
            e = {"kind": _FATBIN_KINDS.get(kind, f"kind{kind}"), "arch": f"sm_{sm}",
                 "size": padded}
            if payload[:4] == b"\x7fELF":
                (e["machine"],) = struct.unpack_from("<H", payload, 18)
                (flags,) = struct.unpack_from("<I", payload, 48)
                # CUDA ELF e_flags: arch in bits 8..15 (current ABI) or 0..7 (older)
                e["elf_arch"] = f"sm_{(flags >> 8) & 0xFF or flags & 0xFF}"
            entries.append(e)
            off += ehsize + padded
    except struct.error:
        return None
    if not entries:
        return None
    return {"offset": start, "size": hsize + fsize, "entries": entries}


def device_code(path: str | os.PathLike) -> dict:
    """What device code an exported library carries, from its bytes (no loading).

    ``{"fatbins": [...]}`` (see ``fatbin_entries``) plus ``"archs"``, the SASS archs, and
    ``"cuda_source"``: whether CUDA C++ source (to be compiled on the deploy host) is embedded.
    """
    data = Path(path).read_bytes()
    fats = fatbin_entries(data)
    archs = sorted({e["arch"] for f in fats for e in f["entries"] if e["kind"] == "elf"})
    has_source = b'extern "C" __global__' in data
    return {"fatbins": fats, "archs": archs, "cuda_source": has_source}

"""LLVM IR text that kernels link (``pragma_import_llvm``): several snippets as one module."""

from __future__ import annotations


def join_ir(*texts: str) -> str:
    """Several functions' IR as one text for one kernel, each text once and each declaration
    once (two steps that call the same intrinsic both declare it, and LLVM refuses a second
    declaration)."""
    seen: set[str] = set()
    lines = []
    for text in dict.fromkeys(texts):
        for line in text.splitlines():
            if line.startswith("declare"):
                if line in seen:
                    continue
                seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"

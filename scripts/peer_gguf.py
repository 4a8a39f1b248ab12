"""llama.cpp's convert_hf_to_gguf.py for a peer checkpoint whose tokenizer the converter does not know.

The converter names a BPE pre-tokenizer by hashing how the tokenizer splits a fixed text, and refuses a
tokenizer it has no hash for; the test checkpoints rsedge writes (``rsedge make-checkpoint``) carry a small
trained tokenizer of their own. Speed does not depend on it (the benchmark feeds token ids), so this names
the pre-tokenizer the real model uses (Qwen2's) and runs the converter unchanged otherwise.

    python scripts/peer_gguf.py LLAMA_CPP_DIR QWEN2 --outtype f16 --outfile f16.gguf [--pre qwen2]
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    llama_cpp, args = Path(sys.argv[1]), sys.argv[2:]
    pre = "qwen2"
    if "--pre" in args:
        i = args.index("--pre")
        pre = args[i + 1]
        del args[i : i + 2]
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

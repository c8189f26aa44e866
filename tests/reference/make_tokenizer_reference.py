"""Write tests/fixtures/smollm2_tokenizer_reference.json: transformers' token ids and chat-template
output for the default model's GGUF, the reference that tests/test_tokenizer.py and
tests/test_chat.py compare against (CI has no transformers).

Run by hand, in a separate virtualenv (keep torch/transformers out of the project):
    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy tokenizers jinja2 sentencepiece protobuf
    /tmp/refvenv/bin/python tests/reference/make_tokenizer_reference.py [--gguf PATH]

Two id lists per string:
- `ids_transformers`: transformers' GGUF tokenizer as loaded (it does not split digits);
- `ids_split_digits`: the same tokenizer with its backend pre-tokenizer replaced by
  Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]),
  the pre-tokenizer of the original SmolLM2 tokenizer.json and of llama.cpp's `smollm` type.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
from pathlib import Path

import tokenizers
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "smollm2_tokenizer_reference.json"
DEFAULT_GGUF = Path.home() / ".cache" / "nanoflow_jax" / "SmolLM2-135M-Instruct.Q4_1.gguf"

STRINGS = [
    "Hello, world!",
    "",
    " ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>x<file_sep>",
    "a<|im_end|>b <|im_start|> c",
    "<|im_start|<|im_end|>>",
    "你好，世界！今天天气很好。",
    "こんにちは、カタカナ。한국어 문장.",
    "Ünïcödé àccénts: café, naïve, façade, Zürich, São Paulo, Ærøskøbing",
    "e\u0301 (combining) and \u00e9 (precomposed), a\u200bb zero-width, \u00a0nbsp",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 end",
    "  leading spaces",
    "trailing   ",
    "a    b     c",
    "\t\ttabs\tand\n\nnewlines\r\nwindows",
    "\n\n\n",
    "line1\n  indented\n\tTabbed\n",
    "1", "12", "123", "1234", "12345", "123456789", " 42", "x2024y",
    "3.14159 and -2.5e-10",
    "1,000,000 people; 100% sure; $19.99",
    "The year 2024 had 366 days.",
    " ²³ squared, ½ cup, x ① ② ③, ٣٤ ",
    "v1.2.3-rc4 at 10:45:07 on 2025-01-31",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n",
    "for (let i = 0; i < n; i++) {\n\tconsole.log(`i=${i}`);\n}\n",
    "<div class=\"a\">&amp;</div>",
    "I'm sure you're right, he'll know; they've said we'd go. It's DON'T",
    "ALLCAPS camelCase snake_case kebab-case",
    "Mixed 中文 and English 123 with émojis 🙂!",
]

CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}], True),
    ([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! 😀"}], False),
    ([{"role": "user", "content": "no prompt"}], False),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    args = ap.parse_args()
    gguf = args.gguf.resolve()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    split = copy.deepcopy(tok)
    split.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({
            "text": s,
            "ids_transformers": ids,
            "ids_split_digits": split.encode(s, add_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    chats = [{"messages": m, "add_generation_prompt": g,
              "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)}
             for m, g in CONVERSATIONS]
    data = {
        "made_by": "tests/reference/make_tokenizer_reference.py",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "python": sys.version.split()[0]},
        "gguf": gguf.name,
        "split_digits_pre_tokenizer": "Sequence([Digits(individual_digits=True), "
                                      "ByteLevel(add_prefix_space=False, use_regex=True)]) "
                                      "replacing transformers' backend pre_tokenizer "
                                      f"{tok.backend_tokenizer.pre_tokenizer!r}",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "cases": cases,
        "chats": chats,
    }
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    differ = sum(c["ids_transformers"] != c["ids_split_digits"] for c in cases)
    print(f"wrote {OUT} ({len(cases)} strings, {differ} differ between digit modes, {len(chats)} chats)")


if __name__ == "__main__":
    main()

"""Write tests/fixtures/smollm2_hf_reference.{npz,json}: transformers' logits and greedy tokens
for the chat-templated prompt "What is the capital of France?" on the default model's GGUF,
the reference that the model and engine tests compare against (CI has no torch).

Run by hand, in a separate virtualenv (keep torch/transformers out of the project):
    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy tokenizers jinja2 sentencepiece protobuf
    /tmp/refvenv/bin/python tests/reference/make_hf_reference.py [--gguf PATH]

The npz holds `input_ids` [n] int32, the float32 logits of every prompt position
(`logits` [n, V], or `logits_last8` [8, V] when the full array would make the file larger
than about 8 MB), `greedy_ids` (int32, up to 20 new tokens, greedy, stopping at EOS),
`greedy_num_tokens`, `greedy_stopped_at_eos` and `greedy_text`.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
OUT_NPZ = REPO / "tests" / "fixtures" / "smollm2_hf_reference.npz"
OUT_JSON = REPO / "tests" / "fixtures" / "smollm2_hf_reference.json"
DEFAULT_GGUF = Path.home() / ".cache" / "nanoflow_jax" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 20
MAX_BYTES = 8_000_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    args = ap.parse_args()
    gguf = args.gguf.resolve()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)  # `dtype` is the non-deprecated spelling of `torch_dtype`
    model.eval()

    messages = [{"role": "user", "content": PROMPT}]
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tok(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits[0].float().numpy()
        out = model.generate(input_ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        # 20 tokens exactly: EOS ignored (min_new_tokens), so the comparison runs past the answer.
        out20 = model.generate(input_ids, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                               repetition_penalty=1.0, eos_token_id=None, pad_token_id=tok.pad_token_id)
    greedy = out[0, input_ids.shape[1]:].numpy().astype(np.int32)
    greedy20 = out20[0, input_ids.shape[1]:].numpy().astype(np.int32)
    stopped_at_eos = bool(len(greedy) and greedy[-1] == tok.eos_token_id)
    greedy_text = tok.decode(greedy, skip_special_tokens=True)

    arrays = {
        "input_ids": input_ids[0].numpy().astype(np.int32),
        "logits": logits.astype(np.float32),
        "greedy_ids": greedy,
        "greedy_num_tokens": np.int32(len(greedy)),
        "greedy_stopped_at_eos": np.bool_(stopped_at_eos),
        "greedy_text": np.array(greedy_text),
        "greedy_ids_20": greedy20,
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    logits_key = "logits"
    if buf.tell() > MAX_BYTES:
        arrays["logits_last8"] = arrays.pop("logits")[-8:]
        logits_key = "logits_last8"
    np.savez_compressed(OUT_NPZ, **arrays)

    meta = {
        "made_by": "tests/reference/make_hf_reference.py",
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0]},
        "gguf": gguf.name,
        "dtype": "float32",
        "prompt": PROMPT,
        "messages": messages,
        "prompt_text": prompt_text,
        "num_prompt_tokens": int(input_ids.shape[1]),
        "logits_key": logits_key,
        "logits_shape": list(arrays[logits_key].shape),
        "generation": {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "repetition_penalty": 1.0,
                       "eos_token_id": tok.eos_token_id, "stops_at_eos": True},
        "greedy_ids": greedy.tolist(),
        "greedy_num_tokens": len(greedy),
        "greedy_stopped_at_eos": stopped_at_eos,
        "greedy_text": greedy_text,
        "greedy_ids_20_ignore_eos": greedy20.tolist(),
    }
    OUT_JSON.write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT_NPZ} ({OUT_NPZ.stat().st_size} bytes, {logits_key} {arrays[logits_key].shape}) and {OUT_JSON}")
    print(f"greedy ({len(greedy)} tokens, eos={stopped_at_eos}): {greedy_text!r}")


if __name__ == "__main__":
    main()

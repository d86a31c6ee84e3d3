#!/usr/bin/env python3
"""Time of one optimizer step on a config's model: fairseq's ``adam`` against ``d2v_adamw``.

Builds the data2vec 2.0 model of a pretraining config (its parameters, with random
gradients), then alternates steps of the two optimizers (same settings: betas, eps, weight
decay of the config's first Adam) and prints the median milliseconds per step, the ratio
and the largest difference between the two parameter sets afterwards (0 = the same update).

Example::

    python benchmarks/optimizer_step.py benchmarks/configs/text_parity.yaml --threads 1
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flops  # noqa: E402


def first_adam(raw):
    opt = raw.get("optimizer", {})
    if opt.get("_name") == "composite":
        opt = next(iter(opt.groups.values())).optimizer
    return {"adam_betas": list(opt.get("adam_betas", [0.9, 0.999])), "adam_eps": float(opt.get("adam_eps", 1e-8)),
            "weight_decay": float(opt.get("weight_decay", 0.0))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a data2vec_multi pretraining config (yaml)")
    p.add_argument("--steps", type=int, default=60, help="timed steps of each optimizer (default 60)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--vocab", type=int, default=4000, help="text: vocabulary size of the embedding (default 4000)")
    p.add_argument("--device", default="cpu", help="device of the parameters (cpu or cuda)")
    p.add_argument("--impl", default="auto", help="d2v_adamw's optimizer.impl (default auto)")
    args = p.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    import d2v_plugin  # noqa: F401  (registers d2v_adamw)
    from d2v_plugin.checkpoints import VocabularyInfo, _TaskInfo
    from d2v_plugin.models.data2vec2 import Data2VecMultiModel
    from fairseq import optim

    torch.set_num_threads(args.threads)
    cfg, raw = flops.model_config(args.config)
    task = _TaskInfo(VocabularyInfo(args.vocab)) if flops.config_modality(raw) == "text" else None
    settings = first_adam(raw)
    models, opts = [], []
    for name in ("adam", "d2v_adamw"):
        torch.manual_seed(0)
        model = Data2VecMultiModel(cfg, task=task).to(args.device)
        params = [q for q in model.parameters() if q.requires_grad]
        extra = {"impl": args.impl} if name == "d2v_adamw" else {}
        opt_cfg = OmegaConf.create({"_name": name, **settings, "lr": [1e-4], "tpu": False, **extra})
        models.append(params)
        opts.append(optim.build_optimizer(opt_cfg, params))
    g = torch.Generator(device=args.device).manual_seed(0)
    times = {"adam": [], "d2v_adamw": []}
    for step in range(args.steps + 5):
        grads = [torch.randn(q.shape, generator=g, device=args.device) * 1e-3 for q in models[0]]
        for name, params, opt in zip(times, models, opts):
            for q, gr in zip(params, grads):
                q.grad = gr.clone()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            opt.step()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if step >= 5:
                times[name].append(time.perf_counter() - t)
    diff = max(float((a - b).abs().max()) for a, b in zip(*models))
    n = sum(q.numel() for q in models[0])
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"{args.config}: {len(models[0])} tensors, {n / 1e6:.2f} M parameters, {args.threads} thread(s), {args.device}")
    print(f"adam       {med['adam']:8.3f} ms/step (median of {args.steps})")
    print(f"d2v_adamw  {med['d2v_adamw']:8.3f} ms/step ({opts[1].impl})")
    print(f"speed-up   {med['adam'] / med['d2v_adamw']:8.2f}x; largest parameter difference after {args.steps + 5} steps: {diff:.3g}")
    return med, diff


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()

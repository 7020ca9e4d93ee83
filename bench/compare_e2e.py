"""End to end: pyfff's UltraFastBERT against what users run today, same process, same cores.

Systems (random weights, sequence 128, no padding):

* ``pyfff-ufb``: pyfff, UltraFastBERT-1x11-long shape (16 layers, 768, FFF depth 11), loaded from an export;
* ``torch-ufb-upstream``: the same weights run as upstream does (PyTorch; all 4095 FFF logits computed, a 0/1
  decision map built level by level, the dense ``linear_out`` applied to the masked activations), written from
  ``ultrafastbert-spec.md`` (sections 1.3 and 4, "masking simulation");
* ``torch-bert-base``: HuggingFace ``BertModel`` (BERT-base config) in PyTorch, its default attention;
* ``ort-bert-base``: the same model exported to ONNX (opset 17) run by ONNX Runtime (all graph optimisations);
* ``pyfff-bert-base``: the same BERT-base checkpoint loaded by ``pyfff.load``.

Each is timed at batch 1 and 8 on 1 thread and on all usable cores (warm-up call first, then the best of
``--repeat`` calls; tokens/s = batch * 128 / best). Outputs of the same model are compared: pyfff vs PyTorch vs
ONNX Runtime for BERT-base, pyfff vs the upstream-style PyTorch model for UltraFastBERT (where a node logit is
within float32 rounding of 0 the two may route a token differently, so the fraction of tokens that agree to 1e-3
is reported next to the maximum difference).

Needs the ``compare`` extra: ``pip install 'pyfff[compare]'`` (torch CPU, transformers, onnxruntime, onnx)::

    python bench/compare_e2e.py                               # about 5 minutes on 2 cores
    python bench/compare_e2e.py --json docs/e2e.json --plot docs/e2e.png

The exit status is 1 if the outputs of the same model disagree (BERT-base beyond 1e-4, UltraFastBERT on more than
1% of the tokens beyond 1e-3). The bars of the issue "End-to-end speed" are printed at the end: at batch 8, all threads, pyfff-ufb >= 1.8x
ort-bert-base and >= 3x torch-ufb-upstream in tokens/s; pyfff-bert-base time <= 1.3x ort-bert-base's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # encoder_helpers

SEQ = 128
UFB_SHAPE = dict(n_layers=16, hidden=768, n_heads=12, vocab=32768, max_seq=SEQ, n_trees=1, depth=11)


# --------------------------------------------------------------------------- upstream-style PyTorch UltraFastBERT
def torch_upstream_ufb(tensors, config):
    """crammedBERT + FFF as the upstream training code computes it (dense logits, decision map, masking)."""
    import torch
    import torch.nn.functional as F

    from pyfff.encoder._checkpoint import sinusoidal_table

    a = config["arch"]
    H, NH, L, eps = a["hidden_size"], a["attention"]["num_attention_heads"], a["num_transformer_layers"], a["norm_eps"]
    depth, T = a["intermed_depth"], a["intermed_size"]
    n_nodes = 2 ** (depth + 1) - 1
    HD = H // NH
    t = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    pe = torch.from_numpy(sinusoidal_table(a["embedding"]["max_seq_length"], H))

    def fff(x, w_in, b_in, w_out):                                    # x (N, H)
        N = x.shape[0]
        logits = F.linear(x, w_in, b_in).view(N, T, n_nodes)          # (N, T, n_nodes): every neuron
        decision_map = torch.zeros_like(logits)                       # (N, T, n_nodes)
        current = torch.zeros((N, T, 1), dtype=torch.long)
        for _ in range(depth + 1):
            decision_map.scatter_(2, current, 1.0)
            move = (torch.gather(logits, 2, current) > 0).long()      # ties go left
            current = 2 * current + 1 + move
        act = F.gelu(logits) * decision_map                           # (N, T, n_nodes) masked
        return F.linear(act.view(N, T * n_nodes), w_out)              # (N, H) dense linear_out

    @torch.inference_mode()
    def forward(ids):                                                 # ids (B, S) int64 tensor
        B, S = ids.shape
        x = t["encoder.embedding.word_embedding.weight"][ids]
        x = x + t["encoder.embedding.pos_embedding.scale_factor"] * pe[:S]
        x = F.layer_norm(x, (H,), t["encoder.embedding.norm.weight"], t["encoder.embedding.norm.bias"], eps)
        for i in range(L):
            p = f"encoder.layers.{i}."
            h = F.layer_norm(x, (H,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
            qkv = F.linear(h, t[p + "attn.self_attention.query_key_value.weight"]).view(B, S, NH, 3 * HD)
            q, k, v = qkv.split(HD, dim=-1)                           # per-head interleaved [q | k | v]
            scores = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * (1.0 / HD ** 0.5)
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v.transpose(1, 2))   # (B, NH, S, HD)
            x = x + F.linear(ctx.transpose(1, 2).reshape(B, S, H), t[p + "attn.dense.weight"])
            h = F.layer_norm(x, (H,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
            x = x + fff(h.reshape(B * S, H), t[p + "ffn.linear_in.weight"], t[p + "ffn.linear_in.bias"],
                        t[p + "ffn.linear_out.weight"]).view(B, S, H)
        return F.layer_norm(x, (H,), t["encoder.final_norm.weight"], t["encoder.final_norm.bias"], eps)

    return lambda ids, mask: forward(torch.from_numpy(ids)).numpy()


# --------------------------------------------------------------------------- BERT-base
def make_bert_base(folder):
    """Random BERT-base (HF defaults) saved as safetensors; returns (torch model, eager copy for ONNX export)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    model.save_pretrained(folder, safe_serialization=True)
    eager = BertModel(BertConfig(attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    return model, eager


def export_onnx(eager_model, path):
    """ONNX export; the wrapper builds the additive mask itself (transformers 5's mask helpers do not trace)."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, mask):
            ext = (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            return self.m(input_ids=ids, attention_mask=ext).last_hidden_state

    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(ids)
    axes = {0: "batch", 1: "seq"}
    torch.onnx.export(Wrapper(eager_model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})


# --------------------------------------------------------------------------- timing
def best_of(fn, args, repeat):
    """Best and median wall seconds per call, and median process CPU seconds per call (all threads).

    On a shared machine the wall time depends on what else runs; the CPU time shows the work done
    (spin-waiting threads included).
    """
    fn(*args)                                                         # warm-up
    times, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(times), float(np.median(times)), float(np.median(cpu))


def build_systems(work, n_threads):
    import onnxruntime as ort
    import torch

    import pyfff

    torch.set_num_threads(n_threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = n_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(work["onnx"]), so, providers=["CPUExecutionProvider"])
    ufb = pyfff.load(work["ufb_export"], n_threads=n_threads)
    bert = pyfff.load(work["bert_export"], n_threads=n_threads)
    torch_bert = work["torch_bert"]

    def torch_bert_run(ids, mask):
        with torch.inference_mode():
            return torch_bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                              ).last_hidden_state.numpy()

    return {
        "pyfff-ufb": ufb.hidden_states,
        "torch-ufb-upstream": work["torch_ufb"],
        "torch-bert-base": torch_bert_run,
        "ort-bert-base": lambda ids, mask: sess.run(["last_hidden_state"], {"input_ids": ids,
                                                                             "attention_mask": mask})[0],
        "pyfff-bert-base": bert.hidden_states,
    }


def check_outputs(systems, rng):
    """Same model, same inputs: maximum differences (and, for the FFF model, tokens agreeing to 1e-3)."""
    ids = rng.integers(0, 30522, size=(2, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 100:] = 0                                                 # padding in one sequence
    keep = mask.astype(bool)
    ref = systems["torch-bert-base"](ids, mask)
    out = {}
    for name in ("ort-bert-base", "pyfff-bert-base"):
        out[f"{name} vs torch-bert-base max abs diff (unpadded)"] = float(np.abs(systems[name](ids, mask)
                                                                                  - ref)[keep].max())
    ids = ids[:, :SEQ]
    a, b = systems["pyfff-ufb"](ids, None), systems["torch-ufb-upstream"](ids, None)
    diff = np.abs(a - b).max(axis=-1)                                 # (B, S) per token
    out["pyfff-ufb vs torch-ufb-upstream max abs diff"] = float(diff.max())
    out["pyfff-ufb vs torch-ufb-upstream tokens within 1e-3"] = float((diff <= 1e-3).mean())
    return out


def prepare(workdir):
    import encoder_helpers as eh

    import pyfff

    work = {}
    t0 = time.perf_counter()
    config = eh.crammed_config(**UFB_SHAPE)
    tensors = eh.crammed_tensors(config, seed=0)
    src, _, _ = eh.write_crammed(workdir / "ufb-1x11", config, tensors)
    work["ufb_export"] = pyfff.export(src, workdir / "ufb-1x11-export", overwrite=True)
    work["torch_ufb"] = torch_upstream_ufb(tensors, config)
    torch_bert, eager = make_bert_base(workdir / "bert-base")
    work["torch_bert"] = torch_bert
    work["bert_export"] = pyfff.export(workdir / "bert-base", workdir / "bert-base-export", overwrite=True)
    work["onnx"] = workdir / "bert-base.onnx"
    export_onnx(eager, work["onnx"])
    print(f"prepared the models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return work


def _ints(text):
    return [int(x) for x in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    n_all = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--batch", type=_ints, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--threads", type=_ints, default=sorted({1, n_all}),
                        help=f"thread counts (default 1,{n_all} = all usable cores)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per case after a warm-up (default 3)")
    parser.add_argument("--systems", default=None, help="comma-separated subset of the systems")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart (tokens/s per system) here (needs matplotlib)")
    args = parser.parse_args(argv)

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pyfff-e2e-")
        workdir = Path(tmp.name)
    work = prepare(workdir)
    rng = np.random.default_rng(0)
    results, checks = [], None
    for n_threads in args.threads:
        systems = build_systems(work, n_threads)
        if checks is None:
            checks = check_outputs(systems, rng)
            for k, v in checks.items():
                print(f"check: {k}: {v:.3g}", file=sys.stderr)
        for batch in args.batch:
            ids = rng.integers(0, 30522, size=(batch, SEQ)).astype(np.int64)
            mask = np.ones_like(ids)
            for name, fn in systems.items():
                if args.systems and name not in args.systems.split(","):
                    continue
                best, median, cpu = best_of(fn, (ids, mask), args.repeat)
                row = dict(system=name, threads=n_threads, batch=batch, seq=SEQ, best_s=best, median_s=median,
                           cpu_s=cpu, tokens_per_s=batch * SEQ / best, tokens_per_cpu_s=batch * SEQ / cpu,
                           load_average_1min=os.getloadavg()[0])
                results.append(row)
                print(f"{name:<20} threads={n_threads:<2} batch={batch:<2} best {best * 1e3:9.1f} ms  "
                      f"median {median * 1e3:9.1f} ms  cpu {cpu * 1e3:9.1f} ms  {row['tokens_per_s']:8.0f} tokens/s  "
                      f"(load {row['load_average_1min']:.1f})", file=sys.stderr)
    bars = evaluate_bars(results, max(args.threads))
    print_table(results, bars)
    if args.json:
        meta = {"machine": platform.platform(), "processor": platform.processor(), "cores": n_all,
                "load_average": os.getloadavg(), "seq": SEQ, "repeat": args.repeat}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "checks": checks, "results": results, "bars": bars}, fh, indent=1)
    if args.plot:
        plot(results, args.plot)
    if tmp is not None:
        tmp.cleanup()
    return 0 if checks_pass(checks) else 1


def checks_pass(checks):
    """Same model, same answer: BERT-base outputs within 1e-4; the FFF model within 1e-3 on 99% of tokens."""
    ok = all(v <= 1e-4 for k, v in checks.items() if "bert-base" in k)
    ok &= checks["pyfff-ufb vs torch-ufb-upstream tokens within 1e-3"] >= 0.99
    if not ok:
        print(f"WRONG: outputs of the same model disagree: {checks}", file=sys.stderr)
    return ok


def evaluate_bars(results, n_all):
    def tps(system, batch=8, threads=n_all):
        for r in results:
            if (r["system"], r["batch"], r["threads"]) == (system, batch, threads):
                return r["tokens_per_s"]
        return None

    ufb, ort_bert, up, pb = tps("pyfff-ufb"), tps("ort-bert-base"), tps("torch-ufb-upstream"), tps("pyfff-bert-base")
    bars = []
    if ufb and ort_bert:
        bars.append(dict(bar="pyfff-ufb / ort-bert-base tokens/s >= 1.8", value=ufb / ort_bert, met=ufb / ort_bert >= 1.8))
    if ufb and up:
        bars.append(dict(bar="pyfff-ufb / torch-ufb-upstream tokens/s >= 3", value=ufb / up, met=ufb / up >= 3))
    if pb and ort_bert:
        bars.append(dict(bar="pyfff-bert-base time / ort-bert-base time <= 1.3", value=ort_bert / pb,
                         met=ort_bert / pb <= 1.3))
    return bars


def print_table(results, bars):
    print("| system | threads | batch | best ms | median ms | tokens/s | CPU s per call | tokens per CPU-second |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['threads']} | {r['batch']} | {r['best_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} "
              f"| {r['tokens_per_s']:.0f} | {r['cpu_s']:.3f} | {r['tokens_per_cpu_s']:.0f} |")
    print()
    for b in bars:
        print(f"{b['bar']}: {b['value']:.2f} -> {'met' if b['met'] else 'NOT met'}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["threads"], r["batch"]) for r in results})
    systems = list(dict.fromkeys(r["system"] for r in results))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(systems)
    for j, name in enumerate(systems):
        vals = [next((r["tokens_per_s"] for r in results if r["system"] == name and (r["threads"], r["batch"]) == c), 0)
                for c in cases]
        ax.bar(np.arange(len(cases)) + j * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(cases)) + width * (len(systems) - 1) / 2)
    ax.set_xticklabels([f"{t} thread(s), batch {b}" for t, b in cases])
    ax.set_ylabel(f"tokens/s (sequence {SEQ})")
    ax.set_title("Encoder throughput: UltraFastBERT-1x11 shape and BERT-base, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

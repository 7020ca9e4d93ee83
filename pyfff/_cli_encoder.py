"""``pyfff export | fill-mask | embed | info``: the encoder on the command line.

Errors a user can cause (missing folder, corrupt file, unsupported config,
text without a mask token) are printed as one ``pyfff <command>: error: ...``
line on stderr with exit status 2; anything else is a bug and propagates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# what a user's input or environment can cause: one line and exit status 2 (OSError: unreadable or read-only
# files, a full disk; a closed stdout is handled by pyfff.__main__)
_USER_ERRORS = (OSError, NotImplementedError, ValueError, TypeError, RuntimeError)


def _threads(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError("threads must be a positive number or -1 (all CPUs)")
    return value


def _add_quantize(p, help="quantize the dense projections to int8 while loading (an int8 export is int8 anyway)"):
    p.add_argument("--quantize", choices=["int8"], default=None, help=help)


def _add_threads(p):
    p.add_argument("-t", "--threads", type=_threads, default=None, metavar="N",
                   help="threads for the FFF kernels and BLAS (default: all usable cores; -1: all CPUs)")


def _guard(command):
    """Run ``command(args)``; user errors become one line on stderr and exit status 2."""
    def run(args):
        try:
            return command(args)
        except BrokenPipeError:
            raise
        except _USER_ERRORS as exc:
            print(f"pyfff {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return run


# --------------------------------------------------------------------------- commands
def _export(args):
    from .encoder import export

    dst = export(args.src, args.dst, overwrite=args.overwrite, quantize=args.quantize)
    size = os.path.getsize(os.path.join(dst, "model.safetensors"))
    print(f"wrote {dst} ({size / 1e6:.1f} MB of kernel-ready weights)")
    return 0


def _fill_mask(args):
    from .encoder import load

    model = load(args.model, n_threads=args.threads, quantize=args.quantize)
    results = model.fill_mask(args.text, top_k=args.top_k)
    if args.json:
        print(json.dumps([[{"token": t, "probability": p} for t, p in preds] for preds in results], indent=1))
        return 0
    for i, preds in enumerate(results):
        if len(results) > 1:
            print(f"mask {i + 1}:")
        for token, prob in preds:
            print(f"  {prob:8.4f}  {token}")
    return 0


def _read_lines(path):
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no text file at {path!r}")
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    if not lines:
        raise ValueError(f"{path}: no lines to embed")
    return lines


def _embed(args):
    from .encoder import load

    model = load(args.model, n_threads=args.threads, quantize=args.quantize)
    emb = model.embed(_read_lines(args.file), batch_size=args.batch_size)
    if args.output:
        np.save(args.output, emb)
        print(f"wrote {args.output}: {emb.shape[0]} embeddings of size {emb.shape[1]} (float32)")
    else:
        np.savetxt(sys.stdout, emb, fmt="%.7g")
    return 0


def _info(args):
    from .encoder import load

    model = load(args.model)
    cfg = model.config
    n_bytes = sum(a.nbytes for a in model.params.values())
    info = {
        "path": os.path.abspath(args.model),
        "architecture": cfg.architecture,
        "head": cfg.head,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": cfg.n_heads,
        "feedforward": (f"FFF depth {cfg.ffn_depth}, {cfg.ffn_n_trees} tree(s), "
                        f"{cfg.ffn_n_trees * (cfg.ffn_depth + 1)} of {cfg.ffn_n_trees * (2 ** (cfg.ffn_depth + 1) - 1)} "
                        "neurons per token" if cfg.ffn_type == "fff" else f"dense {cfg.d_ff}"),
        "vocab_size": cfg.vocab_size,
        "max_positions": cfg.max_positions,
        "max_length": cfg.max_length,
        "num_labels": cfg.num_labels,
        "pooler": cfg.pooler,
        "sentence_pooling": "+".join(cfg.sentence_pooling) + (" + L2 norm" if cfg.sentence_normalize else ""),
        "pad_token": cfg.pad_token,
        "mask_token": cfg.mask_token,
        "quantize": cfg.quantize or "none (float32)",
        "parameters": model.n_parameters(),
        "weights_MB": round(n_bytes / 1e6, 2),
        "n_threads": model.n_threads,
    }
    if args.json:
        print(json.dumps({"summary": info, "config": cfg.to_dict()}, indent=1))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return 0


# --------------------------------------------------------------------------- registration
def add_parser(subparsers):
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "export", formatter_class=fmt,
        help="write a kernel-ready copy of an UltraFastBERT/BERT checkpoint (fast, memory-mapped loading)",
        description="Convert a HuggingFace-format checkpoint folder (crammedBERT/UltraFastBERT or BERT:\n"
                    "config.json + model.safetensors [+ tokenizer.json]) into pyfff's kernel-ready format:\n"
                    "model.safetensors with fused QKV and node-major FFF weights, plus config.json and the\n"
                    "tokenizer files. pyfff.load maps the result without copying.",
        epilog="example:\n  pyfff export UltraFastBERT-1x11-long/ ufb-pyfff/")
    p.add_argument("src", help="checkpoint folder (HF format or an earlier pyfff export)")
    p.add_argument("dst", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty DST")
    _add_quantize(p, "store the dense projections as int8 (about 4x smaller; the export loads as int8)")
    p.set_defaults(func=_guard(_export))

    p = subparsers.add_parser(
        "fill-mask", formatter_class=fmt,
        help="predict the tokens behind each mask token of a text (MLM checkpoints)",
        description="Run a masked-language-model checkpoint on TEXT and print the TOP_K most likely\n"
                    "tokens with their probabilities for every mask token (<mask> for UltraFastBERT,\n"
                    "[MASK] for BERT).",
        epilog='example:\n  pyfff fill-mask UltraFastBERT-1x11-long/ "The capital of France is <mask>."')
    p.add_argument("model", help="checkpoint folder or pyfff export")
    p.add_argument("text", help="text containing at least one mask token")
    p.add_argument("-k", "--top-k", type=int, default=5, help="predictions per mask (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_threads(p)
    _add_quantize(p)
    p.set_defaults(func=_guard(_fill_mask))

    p = subparsers.add_parser(
        "embed", formatter_class=fmt,
        help="sentence embeddings for every line of a text file",
        description="Embed each line of FILE ('-' for stdin) with the checkpoint's sentence pooling\n"
                    "(sentence-transformers modules.json / 1_Pooling; default: mean over tokens).\n"
                    "Writes a float32 .npy array of shape (lines, size) with --output, else prints\n"
                    "one embedding per line.",
        epilog="example:\n  pyfff embed all-MiniLM-L6-v2/ sentences.txt -o emb.npy")
    p.add_argument("model", help="checkpoint folder or pyfff export")
    p.add_argument("file", help="UTF-8 text file, one text per line ('-': stdin)")
    p.add_argument("-o", "--output", help="write a .npy file instead of printing")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    _add_threads(p)
    _add_quantize(p)
    p.set_defaults(func=_guard(_embed))

    p = subparsers.add_parser(
        "info", formatter_class=fmt,
        help="describe a checkpoint: architecture, sizes, tokenizer, weights",
        description="Load MODEL (validating every tensor) and print its architecture, sizes,\n"
                    "head, tokenizer settings and weight size.",
        epilog="example:\n  pyfff info UltraFastBERT-1x11-long/ --json")
    p.add_argument("model", help="checkpoint folder or pyfff export")
    p.add_argument("--json", action="store_true", help="print JSON (summary and full config)")
    p.set_defaults(func=_guard(_info))

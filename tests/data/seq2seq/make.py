#!/usr/bin/env python3
"""A tiny, weight-free encoder/decoder ONNX bundle whose greedy decoding output is exactly known,
for testing the guest agent's seq2seq decode loop in a VM without a real translation model.

usage: make.py OUT_DIR     (writes encoder.onnx, decoder.onnx, tokenizer.json, agentos-model.toml)

The committed files in this directory were made by it; the VM tests embed them.

Vocabulary (V = 32): 0 = PAD and decoder_start_token_id, 1 = EOS, 2 = UNK (unused), 3..31 = content tokens.
Hidden size D = 48 (!= V on purpose, so a loop that confuses hidden size and vocab size fails).

encoder.onnx
  in : input_ids        int64 [batch, src_seq]
       attention_mask   int64 [batch, src_seq]   (1 = token, 0 = padding; right padding)
  out: encoder_hidden_states float32 [batch, src_seq, 48]   (one-hot of the id in dims 0..31, zero on padding)

decoder_{copy,reverse,cumsum}.onnx
  in : input_ids              int64   [batch, tgt_seq]   (all decoder tokens so far, starting with 0)
       encoder_hidden_states  float32 [batch, src_seq, 48]
       encoder_attention_mask int64   [batch, src_seq]
  out: logits                 float32 [batch, tgt_seq, 32]  (+10 on the chosen id, -10 elsewhere)

Let src = non-padding source ids, L = len(src), t = decoder position (0-based), x_t = input_ids[:, t].
  copy   : y_t = src[t]            for t < L, EOS for t >= L    -> greedy output  src + [EOS]
  reverse: y_t = src[L-1-t]        for t < L, EOS for t >= L    -> greedy output  reversed(src) + [EOS]
  cumsum : y_t = 3 + ((max(x_t-3,0) + src[t]-3) mod 29), EOS for t >= L
           depends on the token fed back, so it catches loops that feed back the wrong token:
           greedy output = running sums of (src-3) mod 29, shifted by 3, then EOS.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

V, D, OPSET = 32, 48, 17
PAD, EOS, FIRST = 0, 1, 3


def c(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def save(nodes, inits, ins, outs, name, path):
    g = helper.make_graph(nodes, name, ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="agentos-test")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)


def encoder(path):
    emb = np.zeros((V, D), np.float32); emb[np.arange(V), np.arange(V)] = 1.0
    N = helper.make_node
    nodes = [
        N("Gather", ["emb", "input_ids"], ["e"]),                                  # [B,S,D]
        N("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        N("Unsqueeze", ["mf", "ax_m1"], ["mf3"]),                                  # [B,S,1]
        N("Mul", ["e", "mf3"], ["encoder_hidden_states"]),
    ]
    ii = lambda n, s: helper.make_tensor_value_info(n, TensorProto.INT64, s)
    save(nodes, [c("emb", emb), c("ax_m1", np.array([-1], np.int64))],
         [ii("input_ids", ["batch", "src_seq"]), ii("attention_mask", ["batch", "src_seq"])],
         [helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", "src_seq", D])],
         "toy_encoder", path)


def decoder(mode, path):
    N = helper.make_node
    nodes = [
        # source ids back from the hidden states: argmax over the first V dims
        N("Slice", ["encoder_hidden_states", "zero1", "v1", "ax2"], ["eh"]),          # [B,S,V]
        N("Cast", ["encoder_attention_mask"], ["emf"], to=TensorProto.FLOAT),
        N("ReduceSum", ["encoder_attention_mask", "ax1"], ["L"], keepdims=1),         # [B,1] int64
        N("Shape", ["input_ids"], ["dshape"]),
        N("Gather", ["dshape", "one"], ["T"], axis=0),
        N("Range", ["zero", "T", "one"], ["t"]),                                       # [T]
        N("Shape", ["encoder_attention_mask"], ["eshape"]),
        N("Gather", ["eshape", "one"], ["S"], axis=0),
        N("Range", ["zero", "S", "one"], ["s"]),                                       # [S]
        N("Unsqueeze", ["t", "ax_m1"], ["t2"]),                                        # [T,1]
        N("Unsqueeze", ["t2", "ax0"], ["t3"]),                                         # [1,T,1]
        N("Unsqueeze", ["L", "ax_m1"], ["L3"]),                                        # [B,1,1]
    ]
    if mode == "reverse":
        nodes += [N("Sub", ["L3", "one"], ["Lm1"]), N("Sub", ["Lm1", "t3"], ["want"])]  # [B,T,1] = L-1-t
    else:
        nodes += [N("Identity", ["t3"], ["want"])]
    nodes += [
        N("Equal", ["s", "want"], ["selb"]),                                           # [B,T,S] broadcast
        N("Cast", ["selb"], ["sel"], to=TensorProto.FLOAT),
        N("MatMul", ["sel", "eh"], ["src_oh"]),                                        # [B,T,V]
        N("ArgMax", ["src_oh"], ["src_id"], axis=-1, keepdims=0),                      # [B,T]
        N("Squeeze", ["L3", "ax_m1"], ["L2"]),                                         # [B,1]
        N("Squeeze", ["t3", "ax_m1"], ["t_row"]),                                      # [1,T]
        N("GreaterOrEqual", ["t_row", "L2"], ["done"]),                                # [B,T]
    ]
    if mode == "cumsum":
        nodes += [
            N("Sub", ["input_ids", "first"], ["xo0"]), N("Max", ["xo0", "zero"], ["xo"]),
            N("Sub", ["src_id", "first"], ["so"]), N("Add", ["xo", "so"], ["sum"]),
            N("Mod", ["sum", "ncontent"], ["m"]), N("Add", ["m", "first"], ["y"]),
        ]
    else:
        nodes += [N("Identity", ["src_id"], ["y"])]
    nodes += [
        N("Where", ["done", "eos", "y"], ["yf"]),
        N("OneHot", ["yf", "depth", "offon"], ["logits"], axis=-1),
    ]
    inits = [c("zero", np.array(0, np.int64)), c("one", np.array(1, np.int64)),
             c("zero1", np.array([0], np.int64)), c("v1", np.array([V], np.int64)), c("ax2", np.array([2], np.int64)),
             c("ax1", np.array([1], np.int64)), c("ax0", np.array([0], np.int64)), c("ax_m1", np.array([-1], np.int64)),
             c("eos", np.array(EOS, np.int64)), c("depth", np.array(V, np.int64)),
             c("offon", np.array([-10.0, 10.0], np.float32))]
    if mode == "cumsum":
        inits += [c("first", np.array(FIRST, np.int64)), c("ncontent", np.array(V - FIRST, np.int64))]
    ii = lambda n, s: helper.make_tensor_value_info(n, TensorProto.INT64, s)
    save(nodes, inits,
         [ii("input_ids", ["batch", "tgt_seq"]),
          helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", "src_seq", D]),
          ii("encoder_attention_mask", ["batch", "src_seq"])],
         [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "tgt_seq", V])],
         f"toy_decoder_{mode}", path)


WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["hello", "world", "agent"]


def tokenizer(path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2}
    vocab.update({w: FIRST + i for i, w in enumerate(WORDS)})
    assert len(vocab) == V
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(path)


if __name__ == "__main__":
    import hashlib
    import os
    import sys

    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    encoder(f"{out}/encoder.onnx")
    decoder("reverse", f"{out}/decoder.onnx")
    tokenizer(f"{out}/tokenizer.json")
    files = ["decoder.onnx", "encoder.onnx", "tokenizer.json"]
    sums = {f: hashlib.sha256(open(f"{out}/{f}", "rb").read()).hexdigest() for f in files}
    with open(f"{out}/agentos-model.toml", "w") as m:
        m.write('name = "test-reverse"\n'
                'description = "test model: translate gives the words of its input in reverse order"\n'
                'tasks = ["translate"]\nmax_tokens = 64\n\n'
                '[seq2seq]\nencoder = "encoder.onnx"\ndecoder = "decoder.onnx"\n'
                f"decoder_start = {PAD}\neos = {EOS}\nmax_new_tokens = 64\n\n[files]\n")
        for f in files:
            m.write(f'"{f}" = "{sums[f]}"\n')

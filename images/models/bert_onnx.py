#!/usr/bin/env python3
"""The ONNX graph of a BERT sentence encoder (all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads), written
node by node from its config.json and model.safetensors with onnx.helper, so no deep-learning framework
is needed to export it.

Inputs : input_ids int64 [batch, seq], attention_mask int64 [batch, seq],
         token_type_ids int64 [batch, seq] (optional in HF exports; kept for compatibility)
Outputs: last_hidden_state float32 [batch, seq, 384]
         sentence_embedding float32 [batch, 384] (masked mean pooling + L2 normalisation)

usage: bert_onnx.py MODEL_DIR OUT.onnx
"""
import json
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file


def build(model_dir):
    """The encoder as an onnx.ModelProto, checked."""
    cfg = json.load(open(f"{model_dir}/config.json"))
    W = load_file(f"{model_dir}/model.safetensors")
    H = cfg["hidden_size"]
    NH = cfg["num_attention_heads"]
    HD = H // NH
    L = cfg["num_hidden_layers"]
    EPS = cfg["layer_norm_eps"]
    assert cfg["hidden_act"] == "gelu" and cfg["position_embedding_type"] == "absolute"

    nodes, inits = [], []
    _n = [0]


    def uid(p):
        _n[0] += 1
        return f"{p}_{_n[0]}"


    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name


    def node(op, ins, attrs=None, name=None):
        out = name or uid(op)
        nodes.append(helper.make_node(op, ins, [out], name=uid("n_" + op), **(attrs or {})))
        return out


    # shared constants
    const("one_f", np.array(1.0, np.float32))
    const("neg_big", np.array(-1e4, np.float32))  # same additive mask constant as old HF BERT
    const("scale", np.array(1.0 / np.sqrt(HD), np.float32))
    const("half", np.array(0.5, np.float32))
    const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    const("shape_split", np.array([0, 0, NH, HD], np.int64))
    const("shape_merge", np.array([0, 0, H], np.int64))
    const("axes_1", np.array([1], np.int64))
    const("axes_m1", np.array([-1], np.int64))
    const("axes_12", np.array([1, 2], np.int64))
    const("zero_i", np.array(0, np.int64))
    const("one_i", np.array(1, np.int64))
    const("idx1", np.array(1, np.int64))
    const("eps_pool", np.array(1e-9, np.float32))
    const("eps_norm", np.array(1e-12, np.float32))


    def linear(x, prefix):
        w = const(prefix + ".weight_T", W[prefix + ".weight"].T.copy())  # [in, out]
        b = const(prefix + ".bias", W[prefix + ".bias"])
        return node("Add", [node("MatMul", [x, w]), b])


    def layernorm(x, prefix):
        g = const(prefix + ".weight", W[prefix + ".weight"])
        b = const(prefix + ".bias", W[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], {"axis": -1, "epsilon": EPS})


    # ---- embeddings
    we = const("word_embeddings", W["embeddings.word_embeddings.weight"])
    pe = const("position_embeddings", W["embeddings.position_embeddings.weight"])
    te = const("token_type_embeddings", W["embeddings.token_type_embeddings.weight"])
    seq_len = node("Gather", [node("Shape", ["input_ids"]), "idx1"], {"axis": 0})
    pos_ids = node("Range", ["zero_i", seq_len, "one_i"])
    x = node("Add", [node("Gather", [we, "input_ids"]), node("Gather", [pe, pos_ids])])
    x = node("Add", [x, node("Gather", [te, "token_type_ids"])])
    x = layernorm(x, "embeddings.LayerNorm")

    # ---- additive attention mask [B,1,1,S]
    mask_f = node("Cast", ["attention_mask"], {"to": TensorProto.FLOAT})
    ext = node("Mul", [node("Sub", ["one_f", mask_f]), "neg_big"])
    ext = node("Unsqueeze", [ext, "axes_12"])

    for i in range(L):
        p = f"encoder.layer.{i}."
        q = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.query"), "shape_split"])], {"perm": [0, 2, 1, 3]})
        k = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.key"), "shape_split"])], {"perm": [0, 2, 3, 1]})
        v = node("Transpose", [node("Reshape", [linear(x, p + "attention.self.value"), "shape_split"])], {"perm": [0, 2, 1, 3]})
        s = node("Add", [node("Mul", [node("MatMul", [q, k]), "scale"]), ext])
        a = node("MatMul", [node("Softmax", [s], {"axis": -1}), v])
        a = node("Reshape", [node("Transpose", [a], {"perm": [0, 2, 1, 3]}), "shape_merge"])
        x = layernorm(node("Add", [linear(a, p + "attention.output.dense"), x]), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        # exact (erf) GELU, as HF "gelu"
        h = node("Mul", [node("Mul", [h, "half"]), node("Add", [node("Erf", [node("Mul", [h, "inv_sqrt2"])]), "one_f"])])
        x = layernorm(node("Add", [linear(h, p + "output.dense"), x]), p + "output.LayerNorm")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))

    # ---- masked mean pooling + L2 normalise
    m3 = node("Unsqueeze", [mask_f, "axes_m1"])  # [B,S,1]
    summed = node("ReduceSum", [node("Mul", [x, m3]), "axes_1"], {"keepdims": 0})  # [B,H]
    cnt = node("Max", [node("ReduceSum", [m3, "axes_1"], {"keepdims": 0}), "eps_pool"])  # [B,1]
    mean = node("Div", [summed, cnt])
    norm = node("Max", [node("Sqrt", [node("ReduceSum", [node("Mul", [mean, mean]), "axes_m1"], {"keepdims": 1})]), "eps_norm"])
    nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"]))

    ii = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2",
        [ii("input_ids"), ii("attention_mask"), ii("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", H]),
         helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", H])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="agentos")
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    onnx.checker.check_model(model)

    return model


if __name__ == "__main__":
    onnx.save(build(sys.argv[1]), sys.argv[2])

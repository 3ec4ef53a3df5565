"""The GQ selection step as an ONNX graph, written node by node.

Inputs:  mu [R, d], logvar [R, d] (float32, R = ROWS fixed), codebook [K, d] (float32, K fixed)
Output:  ids [R] (int64)

It computes exactly the score of gqtok/select.py,
  score = (beta - 1/sigma^2) . c^2 + (2 mu / sigma^2) . c,
as one MatMul of [R, 2d] token features by the [2d, K] codeword features,
then ArgMax (first maximum, so ties go to the lowest index as in numpy).

Why fixed R: every call has the same shapes, so the runtime takes the same
kernels and a token's id cannot depend on its neighbours; callers pad the
last block. Memory: the [R, K] score matrix is the peak, 4 * R * K bytes
(16 MiB for R = 64 and K = 2^16); R = ROWS keeps it small and bounded.
The graph is small enough to write by hand, which keeps each op visible.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from gqtok.core.select import LOGVAR_RANGE

ROWS = 64  # tokens per call (fixed)


def build_gq_select(num_codes: int, dim: int, beta: float, rows: int = ROWS, opset: int = 18) -> onnx.ModelProto:
    f32 = TensorProto.FLOAT

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, f32, [], [value]))

    nodes = [
        const("lo", LOGVAR_RANGE[0]), const("hi", LOGVAR_RANGE[1]), const("beta", beta), const("two", 2.0),
        helper.make_node("Clip", ["logvar", "lo", "hi"], ["lv"]),
        helper.make_node("Neg", ["lv"], ["neg_lv"]),
        helper.make_node("Exp", ["neg_lv"], ["inv_var"]),  # 1 / sigma^2
        helper.make_node("Sub", ["beta", "inv_var"], ["quad"]),  # beta - 1/sigma^2
        helper.make_node("Mul", ["mu", "inv_var"], ["mu_iv"]),
        helper.make_node("Mul", ["mu_iv", "two"], ["lin"]),  # 2 mu / sigma^2
        helper.make_node("Concat", ["quad", "lin"], ["tok"], axis=1),  # [R, 2d]
        helper.make_node("Mul", ["codebook", "codebook"], ["c2"]),
        helper.make_node("Concat", ["c2", "codebook"], ["code"], axis=1),  # [K, 2d]
        helper.make_node("Transpose", ["code"], ["code_t"], perm=[1, 0]),  # [2d, K]
        helper.make_node("MatMul", ["tok", "code_t"], ["scores"]),  # [R, K]
        helper.make_node("ArgMax", ["scores"], ["ids"], axis=1, keepdims=0, select_last_index=0),
    ]
    graph = helper.make_graph(
        nodes, "gq_select",
        inputs=[helper.make_tensor_value_info("mu", f32, [rows, dim]),
                helper.make_tensor_value_info("logvar", f32, [rows, dim]),
                helper.make_tensor_value_info("codebook", f32, [num_codes, dim])],
        outputs=[helper.make_tensor_value_info("ids", TensorProto.INT64, [rows])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="gqtok")
    onnx.checker.check_model(model, full_check=True)
    return model

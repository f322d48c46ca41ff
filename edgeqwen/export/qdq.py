"""Float standard-op graph -> weight-only int8 graph in standard ONNX ops (the portable backend).

Every ``MatMul(x, W)`` with a constant ``W[K, N]`` becomes ``MatMul(x, DequantizeLinear(W_q, scale, axis=1))``
with int8 ``W_q`` and one scale per output channel; the embedding ``Gather(E, ids)`` becomes a Gather of
int8 rows times a Gather of per-row scales. Activations stay float: dynamic per-tensor activation
quantization (Optimum's int8 default) is what multiplied perplexity by 2.4 in our measurements.

Only standard ops (opset 13+ DequantizeLinear with ``axis``), so CoreML/NNAPI/XNNPACK can take the graph.
onnxruntime's CPU provider recognises DequantizeLinear -> MatMul on a constant and runs it as MatMulNBits
(8-bit), so on CPU this graph gets the same kernels as the fast backend's int8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quantize import ExternalWeights


@dataclass
class QdqReport:
    tensors: dict[str, dict] = field(default_factory=dict)
    float_bytes: int = 0
    quant_bytes: int = 0

    def add(self, name: str, how: str, shape: tuple, quant_bytes: int) -> None:
        self.tensors[name] = {"how": how, "bits": 8, "shape": list(shape)}
        self.float_bytes += int(np.prod(shape)) * 4
        self.quant_bytes += quant_bytes

    def summary(self) -> dict:
        hows: dict[str, int] = {}
        for t in self.tensors.values():
            hows[t["how"]] = hows.get(t["how"], 0) + 1
        return {"tensors": len(self.tensors), "by_method": hows, "float_mb": round(self.float_bytes / 2**20, 1),
                "quant_mb": round(self.quant_bytes / 2**20, 1)}


def int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along ``axis`` (kept), reducing over the other axis."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    return q, scale


def _is_float_matrix(t: onnx.TensorProto | None) -> bool:
    return t is not None and len(t.dims) == 2 and t.data_type == TensorProto.FLOAT


def quantize_graph_qdq(model: onnx.ModelProto, weights: ExternalWeights,
                       progress: Callable[[Iterable], Iterable] | None = None) -> QdqReport:
    """Rewrite ``model`` in place; returns what was quantized. Small float tensors stay float."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    report = QdqReport()
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    rows: dict[str, tuple[str, str]] = {}  # float embedding name -> (int8 name, scale name)
    new_nodes: list[onnx.NodeProto] = []
    nodes = list(graph.node)
    embeddings = [n.input[0] for n in nodes if n.op_type == "Gather" and _is_float_matrix(inits.get(n.input[0]))]
    for node in (progress(nodes) if progress else nodes):
        if node.op_type == "Gather" and _is_float_matrix(inits.get(node.input[0])):
            name = node.input[0]
            q_name, s_name = _embedding_rows(name, weights, rows, new_inits, report)
            drop.add(name)
            out, base = node.output[0], node.name or name
            new_nodes += [
                helper.make_node("Gather", [q_name, node.input[1]], [out + "/q"], name=base + "/q", axis=0),
                helper.make_node("Gather", [s_name, node.input[1]], [out + "/scale"], name=base + "/scale", axis=0),
                helper.make_node("Cast", [out + "/q"], [out + "/f"], name=base + "/cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [out + "/f", out + "/scale"], [out], name=base + "/dequant")]
            continue
        if node.op_type == "MatMul":
            b = node.input[1]
            t = producer.get(b)
            table = None
            if t is not None and t.op_type == "Transpose" and _is_float_matrix(inits.get(t.input[0])) and (
                    list(t.attribute[0].ints) if t.attribute else [1, 0]) == [1, 0]:
                table = t.input[0]  # Optimum tied it: MatMul(h, Transpose(E))
                t.input[0] = _embedding_rows(table, weights, rows, new_inits, report)[0]
                transposed = t.output[0]
            elif _is_float_matrix(inits.get(b)):
                table = _same_as_embedding(b, inits, embeddings, weights)
                if table is not None:  # tied weights exported as two copies: keep one
                    transposed = b + "/from_embedding"
                    new_nodes.append(helper.make_node(
                        "Transpose", [_embedding_rows(table, weights, rows, new_inits, report)[0]], [transposed],
                        name=b + "/Transpose", perm=[1, 0]))
                    drop.add(b)
            if table is not None:
                # lm_head from the embedding's int8 rows: their per-row scales are the per-column scales here
                drop.add(table)
                flat = rows[table][1] + "/flat"
                if flat not in {i.name for i in new_inits}:
                    scales = numpy_helper.to_array(next(i for i in new_inits if i.name == rows[table][1]))
                    new_inits.append(numpy_helper.from_array(scales.reshape(-1), flat))
                new_nodes.append(helper.make_node("DequantizeLinear", [transposed, flat], [b + "/dq"],
                                                  name=table + "/lm_head/DequantizeLinear", axis=1))
                node.input[1] = b + "/dq"
            elif _is_float_matrix(inits.get(b)):
                w = weights.array(b)  # [K, N]
                q, scale = int8_per_channel(w, axis=1)
                new_inits += [numpy_helper.from_array(q, b + "/int8"), numpy_helper.from_array(scale, b + "/scale")]
                report.add(b, "rtn/per-channel", w.shape, q.nbytes + scale.nbytes)
                drop.add(b)
                new_nodes.append(helper.make_node("DequantizeLinear", [b + "/int8", b + "/scale"], [b + "/dq"],
                                                  name=b + "/DequantizeLinear", axis=1))
                node.input[1] = b + "/dq"
        new_nodes.append(node)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    weights.materialize_rest(model)
    graph.initializer.extend(new_inits)
    del graph.node[:]
    graph.node.extend(_topological(new_nodes, {i.name for i in graph.input} | {t.name for t in graph.initializer}))
    return report


def _same_as_embedding(name: str, inits: dict, embeddings: list[str], weights: ExternalWeights) -> str | None:
    """The embedding table whose transpose ``name`` is, value for value (tied weights stored twice)."""
    dims = list(inits[name].dims)
    for table in embeddings:
        if list(inits[table].dims) == dims[::-1] and np.array_equal(weights.array(name), weights.array(table).T):
            return table
    return None


def _embedding_rows(name: str, weights: ExternalWeights, rows: dict, new_inits: list, report: QdqReport):
    """int8 rows + per-row scales of an embedding table, made once even if Gather and lm_head share it."""
    if name not in rows:
        e = weights.array(name)  # [V, H]
        q, scale = int8_per_channel(e, axis=0)
        q_name, s_name = name + "/int8", name + "/row_scale"
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale.reshape(-1, 1), s_name)]
        report.add(name, "rtn/per-row", e.shape, q.nbytes + scale.nbytes)
        rows[name] = (q_name, s_name)
    return rows[name]


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Order nodes so each comes after its inputs' producers (new DequantizeLinear nodes were appended
    before their consumer, but a tied lm_head's Transpose may sit after it in Optimum's order)."""
    done = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in done for i in n.input):
                out.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # inputs from outer scopes or missing: keep the remaining order
            return out + rest
        pending = rest
    return out

"""Oracles shared by the test files: softmax attention from its definition, and the relative error against it."""
import torch


def attention(query, keys, values, scaling, mask=None, dtype=torch.float64):
    """query [H, M, D], keys/values [H, S, D], mask [H, 1 or M, S] (True: attended) -> softmax(q k^T) v [H, M, D],
    computed in `dtype`."""
    logits = torch.einsum("hmd,hsd->hms", query.to(dtype), keys.to(dtype)) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, -float("inf"))
    return torch.einsum("hms,hsd->hmd", logits.softmax(-1), values.to(dtype))


def relative_error(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()

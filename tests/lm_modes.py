"""The three ways to run a stateful language model over a sequence, which must give the same logits."""

import torch


def rnn_logits(model, idx):
    """Token by token through forward_rnn: (logits [B, T, V], final state)."""
    state, outs = model.init_state(idx.shape[0]), []
    for t in range(idx.shape[1]):
        logits, state = model.forward_rnn(idx[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


def chunked_logits(model, idx, cuts):
    """Parallel over the chunks [0, cuts[0]), [cuts[0], cuts[1]), ..., the state carried between them."""
    state, outs = None, []
    for a, b in zip([0, *cuts], [*cuts, idx.shape[1]]):
        logits, state = model(idx[:, a:b], state=state, return_state=True)
        outs.append(logits)
    return torch.cat(outs, 1), state

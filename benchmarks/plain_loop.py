"""The same federated training as fedsim's FedAvg run, as a plain PyTorch loop in one process.

Same clients (fedsim's sampler), same data, batches, seeds, optimizer, schedule, aggregation
(weighted mean in float64, cast back) and evaluation (server test set and every client's local
test split), but no Flower: no messages, records, copies or grid. It is the floor the engines
are measured against (``benchmarks/overhead.py``), and tests/test_end_to_end.py checks that
the inline engine reproduces its numbers. A text model's dropout is torch's own layers and
sdpa's own dropout here (fedsim's engines route it through :mod:`fedsim.dropout`, which draws
the same masks on a CPU).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from fedsim import threads
from fedsim.build import build_components
from fedsim.training import client_generator, evaluate, seed_torch, train_local


@contextmanager
def torch_dropout():
    """Inside: the text tasks' forward passes use torch's own dropout, not fedsim's."""
    import fedsim.tasks.generative as generative
    import fedsim.tasks.text as text

    saved = text.model_dropout, generative.model_dropout
    text.model_dropout = generative.model_dropout = lambda model: nullcontext()
    try:
        yield
    finally:
        text.model_dropout, generative.model_dropout = saved


def plain_fedavg(cfg: dict[str, Any], records: list | None = None) -> list[dict[str, Any]]:
    """Run ``cfg`` (a composed fedsim config using FedAvg) directly; one record per round
    (appended to ``records`` as each round ends, if given: what a stopped run leaves)."""
    with torch_dropout():
        return _plain_fedavg(cfg, [] if records is None else records)


def _plain_fedavg(cfg: dict[str, Any], records: list) -> list[dict[str, Any]]:
    c = build_components(cfg)
    sim = c.sim
    device = c.device
    model, spec = c.model(device)
    threads.apply(getattr(c.engine, "num_threads", 1), model)  # as the engines resolve it
    sent = spec.sent_state(model)  # name -> live parameter
    trained = spec.trained_parameters(model)
    sampler = c.sampler()
    test_set = c.task.test_set()
    steps_done: dict[int, int] = {}
    global_state = {n: p.detach().clone() for n, p in sent.items()}

    def load(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in sent.items():
                p.copy_(state[n])

    def eval_round(server_round: int) -> dict[str, Any]:
        load(global_state)
        res = evaluate(model, c.task, test_set, device=device)
        accs = []
        for client in sampler.evaluate_clients(server_round):
            data = c.data.client(client)
            if data.num_test:
                accs.append(evaluate(model, c.task, data.test, device=device).accuracy)
        return {
            "eval_loss": res.loss,
            "eval_accuracy": res.accuracy,
            "eval_accuracy_client_mean": sum(accs) / len(accs) if accs else None,
            "eval_accuracy_client_min": min(accs) if accs else None,
        }

    records.append({"round": 0, "train_loss": None, **eval_round(0), "round_time_s": 0.0})
    for server_round in range(1, sim["rounds"] + 1):
        t0 = time.perf_counter()
        states, sizes, losses = [], [], []
        for client in sampler.train_clients(server_round):
            data = c.data.client(client)
            load(global_state)
            optimizer = c.make_optimizer(trained, lr=sim["lr"])
            generator = client_generator(sim["seed"], server_round, client)
            seed_torch(generator.initial_seed() + 1)
            res = train_local(
                model,
                c.task,
                data.train,
                optimizer,
                steps=sim["local_steps"],
                batch_size=sim["batch_size"],
                lr=sim["lr"],
                schedule=c.schedule,
                start_step=steps_done.get(client, 0),
                total_steps=c.total_local_steps,
                generator=generator,
                device=device,
            )
            steps_done[client] = steps_done.get(client, 0) + res.steps
            states.append({n: p.detach().clone() for n, p in sent.items()})
            sizes.append(data.num_train)
            losses.append(res.loss)
        total = float(sum(sizes))
        weights = [s / total for s in sizes]
        global_state = {
            n: sum(w * st[n].double() for w, st in zip(weights, states)).to(global_state[n].dtype)
            for n in global_state
        }
        t_eval = time.perf_counter()
        record = {
            "round": server_round,
            "train_loss": sum(w * loss for w, loss in zip(weights, losses)),
            **eval_round(server_round),
        }
        now = time.perf_counter()
        record["round_time_s"] = now - t0
        record["eval_time_s"] = now - t_eval
        records.append(record)
    return records

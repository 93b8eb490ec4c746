"""The workload: users scoring and generating through the public gRPC API of a running federation.

Every request goes through `Federation` on the coordinator with the user's own bearer token
(mixtures with the admin token), exactly as a user's own client would send it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc

from proto import federation_pb2 as pb

from .federation import LocalFederation
from .soup import SOUP_MODEL

MODES = {"uniform": pb.MIXTURE_MODE_UNIFORM, "posterior": pb.MIXTURE_MODE_POSTERIOR}


@dataclass
class WorkloadResult:
    """What the users saw: per-request records and the quality figures derived from them."""

    users: list[dict] = field(default_factory=list)  # own adapter vs base, per known user
    unknown: list[dict] = field(default_factory=list)  # unknown users on the base
    mixtures: list[dict] = field(default_factory=list)  # mixture vs each specialist, per text and mode
    generations: list[dict] = field(default_factory=list)
    soup: list[dict] = field(default_factory=list)  # soup nodes' users: soup vs base vs specialist vs own adapter
    requests: list[dict] = field(default_factory=list)  # every request: kind, user, wall latency, ok/code
    errors: list[str] = field(default_factory=list)


def held_out_slice(suite, name: str, chars: int, k: int = 0) -> str:
    """The k-th slice of ``chars`` characters of ``name``'s held-out text (what scoring request k sends)."""
    full = suite.text(name, "eval")
    start = (k * chars) % max(1, len(full) - chars)
    return full[start:start + chars]


class Driver:
    """Sends the scenario's workload through a federation and collects the results."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.scn = fed.scn
        self.suite = fed.suite
        self.result = WorkloadResult()
        self.sem = asyncio.Semaphore(self.scn.workload.concurrency)
        self.specialists = self.scn.specialists()

    def text(self, name: str, k: int = 0) -> str:
        """The k-th slice of ``name``'s held-out text, of the workload's scoring length."""
        return held_out_slice(self.suite, name, self.scn.workload.score_chars, k)

    async def _call(self, kind: str, user: str, coro_fn):
        async with self.sem:
            t0 = time.perf_counter()
            rec = {"kind": kind, "user": user, "ok": True, "code": "OK"}
            try:
                return await coro_fn()
            except grpc.aio.AioRpcError as exc:
                rec.update(ok=False, code=exc.code().name)
                self.result.errors.append(f"{kind} {user}: {exc.code().name}: {exc.details()}")
                return None
            finally:
                rec["wall_s"] = round(time.perf_counter() - t0, 4)
                self.result.requests.append(rec)

    async def score(self, user: str, text: str, *, use_base: bool = False, mixture: pb.MixtureSpec | None = None,
                    kind: str = "score") -> pb.ScoreReply | None:
        """Score ``text`` for ``user`` (own token) through the coordinator."""
        req = pb.ScoreRequest(user_id=user, text=text, use_base=use_base, omit_token_strings=True, mixture=mixture)
        meta = self.fed.admin if mixture is not None else self.fed.token(user)
        return await self._call(kind, user, lambda: self.fed.stub.Score(req, metadata=meta, timeout=300))

    async def known_user(self, user: str) -> None:
        """Own adapter against the base, on the same held-out text, for each scoring request."""
        src = self.suite.sources[user]
        for k in range(self.scn.workload.score_requests_per_user):
            text = self.text(user, k)
            own, base = await asyncio.gather(self.score(user, text), self.score(user, text, use_base=True))
            if own is None or base is None:
                continue
            self.result.users.append({
                "user": user, "request": k, "persona": src.persona, "node": own.node_id, "model": own.model,
                "tokens": len(own.logprobs), "own_ppl": own.perplexity, "base_ppl": base.perplexity,
                "own_bpc": own.bits_per_char, "base_bpc": base.bits_per_char, "bpc_floor": src.floor_bpc,
                "own_beats_base": own.perplexity < base.perplexity,
                # what the adapter saw of the user's text, of how much there is (None: generated), and
                # what this request scored
                "train_chars": len(self.suite.text(user, "train")),
                "train_chars_available": self.suite.available_chars(user, "train"),
                "scored_chars": own.scored_chars,
            })

    async def unknown_user(self, user: str) -> None:
        """An unknown user (no adapter) is served by the base model."""
        src = self.suite.sources[user]
        for k in range(self.scn.workload.score_requests_per_user):
            r = await self.score(user, self.text(user, k))
            if r is not None:
                self.result.unknown.append({"user": user, "request": k, "persona": src.persona, "node": r.node_id,
                                            "model": r.model, "ppl": r.perplexity, "bpc": r.bits_per_char,
                                            "bpc_floor": src.floor_bpc})

    async def mixture(self, persona: str, mode: str, k: int) -> None:
        """The specialists' mixture on a persona's text, against each specialist alone."""
        specialists = list(self.specialists)
        spec = pb.MixtureSpec(components=[pb.MixtureComponent(specialist=s) for s in specialists],
                              mode=MODES[mode])
        r = await self.score("", self.text(persona, k), mixture=spec, kind="mixture")
        if r is None:
            return
        comps = {c.component.specialist: c.perplexity for c in r.components}  # exp(-mean), from the coordinator
        best = min(comps, key=comps.__getitem__)
        # the per-token bound of Bet 04 (uniform) and the total-regret bound (posterior), checked on the wire
        n = len(specialists)
        mix = list(r.logprobs)
        per_token_ok = all(m >= max(c.logprobs[t] for c in r.components) - math.log(n) - 1e-4
                           for t, m in enumerate(mix))
        regret = max(sum(c.logprobs) for c in r.components) - sum(mix)
        # each mode carries its own guarantee: uniform per token, posterior over the whole sequence
        bound_holds = per_token_ok if mode == "uniform" else regret <= math.log(n) + 1e-3
        mean_attr = {c.component.specialist: sum(c.attribution) / max(1, len(c.attribution)) for c in r.components}
        self.result.mixtures.append({
            "text": persona, "mode": mode, "tokens": len(mix), "mixture_ppl": r.perplexity,
            "components_ppl": comps, "best": best, "best_ppl": comps[best],
            "mixture_over_best": r.perplexity / comps[best], "per_token_bound_holds": per_token_ok,
            "bound_holds": bound_holds,
            "regret_nats": regret, "regret_bound_nats": math.log(n), "mean_attribution": mean_attr,
        })

    async def soup_user(self, node_id: str, user: str) -> None:
        """A soup node's user: the same held-out text on the soup node, the base, the specialist
        node of the user's persona (when the run has one) and the user's own adapter."""
        text, persona = self.text(user, 0), self.suite.sources[user].persona

        def pinned(model: str, node: str = "") -> pb.MixtureSpec:
            return pb.MixtureSpec(components=[pb.MixtureComponent(specialist=model, node_id=node)])
        calls = [self.score(user, text, mixture=pinned(SOUP_MODEL, node_id), kind="soup"),
                 self.score(user, text, use_base=True, kind="soup"), self.score(user, text, kind="soup")]
        if persona in self.specialists:
            calls.append(self.score(user, text, mixture=pinned(persona), kind="soup"))
        soup, base, own, *spec = await asyncio.gather(*calls)
        if soup is None or base is None:
            return
        row = {"user": user, "persona": persona, "node": soup.components[0].node_id, "tokens": len(soup.logprobs),
               "soup_ppl": soup.perplexity, "base_ppl": base.perplexity,
               "own_ppl": own.perplexity if own is not None else None,
               "specialist_ppl": spec[0].perplexity if spec and spec[0] is not None else None}
        self.result.soup.append(row)

    async def generate(self, user: str, k: int) -> None:
        """Stream tokens for ``user``, measuring wall time to the first token."""
        prompt = self.text(user, k)[:120]
        req = pb.GenerateRequest(user_id=user, prompt=prompt, max_new_tokens=self.scn.workload.generate_tokens,
                                 temperature=0.8, top_k=50, seed=self.scn.federation.seed + k)

        async def run():
            t0 = time.perf_counter()
            ttft, pieces = None, []
            async for chunk in self.fed.stub.Generate(req, metadata=self.fed.token(user), timeout=300):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces.append(chunk.text)
            return {"user": user, "tokens": len(pieces), "ttft_wall_s": round(ttft or 0.0, 4),
                    "wall_s": round(time.perf_counter() - t0, 4), "text": "".join(pieces)}
        r = await self._call("generate", user, run)
        if r is not None:
            self.result.generations.append(r)

    async def run(self) -> WorkloadResult:
        """The whole workload, concurrently up to the scenario's concurrency."""
        w = self.scn.workload
        jobs = [self.known_user(u) for u in self.suite.known_users]
        if w.unknown_users:
            jobs += [self.unknown_user(u) for u in self.suite.unknown_users]
        if len(self.specialists) >= 2:
            for p in self.specialists:
                for mode in w.mixture_modes:
                    jobs += [self.mixture(p, mode, k) for k in range(w.mixture_requests)]
        for u in self.suite.known_users:
            jobs += [self.generate(u, k) for k in range(w.generate_requests_per_user)]
        for plan in self.fed.plans:
            jobs += [self.soup_user(plan.node_id, u) for u in plan.group]
        await asyncio.gather(*jobs)
        for lst, key in ((self.result.users, "user"), (self.result.unknown, "user"), (self.result.generations, "user"),
                         (self.result.requests, "user")):
            lst.sort(key=lambda r: (r[key], r.get("kind", "")))
        self.result.mixtures.sort(key=lambda r: (r["text"], r["mode"]))
        self.result.soup.sort(key=lambda r: (r["node"], r["user"]))
        return self.result

"""Exact rank of each query's true answer, feeding only the candidate prefixes that can matter.

A candidate's log-likelihood is a sum of token log-probabilities, each <= 0, so it never exceeds
that of any of its prefixes. Once the true answer's log-likelihood s is known, a prefix scoring
below s rules out every candidate under it; only prefixes scoring >= s need the model. The rank
(1 + the other candidates scoring >= s, so a tie counts against the true answer) and accuracy
(rank 1) are those of scoring every candidate: pruning drops only candidates scoring below s.

Several rankings share one pass (`Ranking`): among a subset of the candidates (sampled
distractors, the study names of a group that also holds other names) and by a calibrated score,
log-likelihood minus a per-candidate offset o(c). A candidate c beats the answer t under an offset
when LL(c) - o(c) >= LL(t) - o(t); every prefix p of c has LL(p) >= LL(c) and, with o_min(p) the
smallest offset under p, LL(p) - o_min(p) >= LL(c) - o(c). So p can be cut once LL(p) - o_min(p)
falls below the answer's calibrated score; rounding is monotone, so this holds in floating point
too (offset 0: the plain bound).

Per batch of queries (`rank`):
  0. the prefill gives the log-probability of every first token;
  1. the true answer's prefixes are fed: its log-likelihood s, and the log-probabilities of
     every child of every prefix on its path;
  2. each further round feeds every prefix whose partial sum is >= s (under some ranking) and
     whose children are not read yet, until there is none. A prefix whose subtree fits in half
     a chunk, or hangs off a single chain of prefixes, is fed with its whole subtree: pruning
     inside it would save a few tokens but cost rounds that re-feed its ancestors. Where little
     can be pruned (a model near chance), this keeps the cost near the exhaustive pass's.

Prefixes are fed as tries after the prompt (`decoding.chunk_logits`); a chunk re-feeds the
ancestors its prefixes attend to, since the cache keeps only the prompt, and the chunks of every
row of a round go through the model together (`decoding.expand_program`). Partial sums are
accumulated in float32, one token at a time, with log-probabilities clipped at 0, so a prefix's
sum bounds its descendants' exactly, rounding included.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Trie:
    """The prefixes of one group's candidates; node 0 is the empty prefix, nodes in preorder."""

    token: np.ndarray  # [T] int32: a node's last token.
    depth: np.ndarray  # [T] int32: its position after the prompt (0: first token; root -1).
    parent: np.ndarray  # [T] int32 (root -1).
    path: np.ndarray  # [T, D] int32: its ancestors from depth 0 down to itself, then -1.
    child_start: np.ndarray  # [T] int32: its children are children[start:start + count].
    child_count: np.ndarray  # [T] int32
    children: np.ndarray  # [T - 1] int32
    leaf: np.ndarray  # [C] int32: each candidate's node.
    end: np.ndarray  # [T] int32: its subtree is nodes [i, end[i]).
    chain: np.ndarray  # [T] bool: the internal nodes of its subtree form one path.

    @classmethod
    def of(cls, tokens: np.ndarray, lengths: np.ndarray) -> "Trie":
        cands = [tuple(int(t) for t in tokens[c, :lengths[c]]) for c in range(len(lengths))]
        prefixes = sorted({c[:d] for c in cands for d in range(len(c) + 1)})
        index = {p: i for i, p in enumerate(prefixes)}
        num = len(prefixes)
        path = np.full((num, max(len(c) for c in cands)), -1, np.int32)
        for i, p in enumerate(prefixes):
            path[i, :len(p)] = [index[p[:d]] for d in range(1, len(p) + 1)]
        parent = np.array([index[p[:-1]] if p else -1 for p in prefixes], np.int32)
        count = np.bincount(parent[1:], minlength=num).astype(np.int32)
        children = (np.argsort(parent[1:], kind="stable") + 1).astype(np.int32)
        start = (np.cumsum(count) - count).astype(np.int32)
        end = np.arange(1, num + 1, dtype=np.int32)
        chain = np.ones(num, bool)
        for i in range(num - 1, -1, -1):  # Children come after their parent in preorder.
            kids = children[start[i]:start[i] + count[i]]
            if len(kids):
                end[i] = end[kids[-1]]
            inner = kids[count[kids] > 0]
            chain[i] = len(inner) == 0 or (len(inner) == 1 and chain[inner[0]])
        return cls(token=np.array([p[-1] if p else 0 for p in prefixes], np.int32),
                   depth=np.array([len(p) - 1 for p in prefixes], np.int32), parent=parent,
                   path=path, child_start=start, child_count=count, children=children,
                   leaf=np.array([index[c] for c in cands], np.int32), end=end, chain=chain)

    def children_of(self, node: int) -> np.ndarray:
        return self.children[self.child_start[node]:self.child_start[node] + self.child_count[node]]

    @property
    def first_tokens(self) -> np.ndarray:
        """The candidates' distinct first tokens (the root's children, in order)."""
        return self.token[self.children_of(0)]

    def unit(self, node: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """What expanding `node` feeds (its ancestors first) and whose children it reads: its
        subtree's internal nodes when they hang off one chain or fit in half a chunk of
        `limit` nodes, else the node alone."""
        inner = node + np.flatnonzero(self.child_count[node:self.end[node]] > 0)
        read = (inner if self.chain[node] or self.depth[node] + len(inner) <= limit // 2
                else inner[:1])
        return np.concatenate([self.path[node, :self.depth[node]], read]), read

    def subtree_min(self, values: np.ndarray) -> np.ndarray:
        """[T] the smallest of `values` [C] over the candidates under each node (itself
        included; inf where none)."""
        out = np.full(len(self.token), np.inf)
        np.minimum.at(out, self.leaf, values)
        for level in range(int(self.depth.max()), -1, -1):  # Children before their parents.
            nodes = np.flatnonzero(self.depth == level)
            np.minimum.at(out, self.parent[nodes], out[nodes])
        return out


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Among which candidates a row's answer is ranked, and by which score.

    allowed: per row, the candidate indices it is ranked among (its answer included), or None
      for every candidate of its trie.
    offset: per trie, [C] values subtracted from the candidates' log-likelihoods (a calibration;
      never NaN; inf for a candidate no row ranks), or None for the log-likelihood itself.
    """

    allowed: Sequence[np.ndarray | None]
    offset: Sequence[np.ndarray] | None = None


# expand(rows [K], tokens [K, N], depth [K, N], ancestor [K, N, N], read_node [K, R],
#        read_token [K, R]) -> log-probabilities [K, R] (`decoding.expand_program`).
Expand = Callable[..., np.ndarray]


def rank(expand: Expand, tries: Sequence[Trie], group: np.ndarray, target: np.ndarray,
         first: np.ndarray, rankings: Sequence[Ranking], chunk_size: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's rank of its true answer under each ranking, and the candidate tokens fed.

    Args:
      expand: runs chunks of trie nodes after their rows' prompts (see `Expand`).
      tries: the candidate tries, by group.
      group: [B] each row's trie (-1: a padding row, skipped).
      target: [B] the true answer's candidate index.
      first: [B, R0] log-probabilities of each row's trie's `first_tokens`.
      rankings: what each rank is taken among and by which score (`Ranking`).
      chunk_size: trie nodes fed per chunk (grows to the longest candidate's prefixes).

    Returns:
      ranks [len(rankings), B] (1 = best; 0 on padding rows) and fed tokens [B].

    Raises:
      FloatingPointError: a log-probability the ranking reads is NaN.
    """
    rows = np.flatnonzero(group >= 0)
    size = np.array([len(tries[group[r]].token) if group[r] >= 0 else 0
                     for r in range(len(group))])
    offset = np.cumsum(size) - size
    row_of = np.repeat(np.arange(len(group)), size)
    partial = np.full(size.sum(), np.nan, np.float32)
    expanded = np.zeros(size.sum(), bool)
    # Per ranking: proper prefixes of a candidate a row ranks, and the least offset under each
    # node of each group (`Trie.subtree_min`; 0 without offsets).
    alive = np.zeros((len(rankings), size.sum()), bool)
    floors = [{} if ranking.offset is None else
              {g: tries[g].subtree_min(ranking.offset[g]) for g in np.unique(group[rows])}
              for ranking in rankings]
    for r in rows:
        trie = tries[group[r]]
        for k, ranking in enumerate(rankings):
            allowed = ranking.allowed[r]
            leaves = trie.leaf if allowed is None else trie.leaf[allowed]
            prefixes = trie.path[trie.parent[leaves]]
            alive[k, offset[r] + prefixes[prefixes >= 0]] = True
        kids = trie.children_of(0)
        partial[offset[r] + kids] = _checked(first[r, :len(kids)])
    fed = np.zeros(len(group), np.int64)
    limit = [max(chunk_size, t.path.shape[1]) for t in tries]  # Nodes a chunk holds.
    # Round 1: the true answer's prefixes, each reading all its children.
    units = {}
    for r in rows:
        trie = tries[group[r]]
        last = trie.parent[trie.leaf[target[r]]]
        if last > 0:
            path = trie.path[last, :trie.depth[last] + 1]
            units[r] = [(path, path)]
    if units:
        _feed(expand, tries, group, offset, units, partial, expanded, fed, limit)

    def offsets(k: int, r: int, candidates: np.ndarray) -> np.ndarray | float:
        offset_k = rankings[k].offset
        return 0.0 if offset_k is None else offset_k[group[r]][candidates]

    # Per ranking and row: the answer's score, against which every other candidate is compared.
    best = np.full((len(rankings), len(group)), np.inf)
    for k in range(len(rankings)):
        for r in rows:
            t = target[r]
            best[k, r] = np.float64(partial[offset[r] + tries[group[r]].leaf[t]]) - offsets(
                k, r, t)

    def floor(k: int, flat: np.ndarray) -> np.ndarray | float:
        if rankings[k].offset is None:
            return 0.0
        rows_of = row_of[flat]
        out = np.empty(len(flat))
        for g, values in floors[k].items():
            at = group[rows_of] == g
            out[at] = values[flat[at] - offset[rows_of[at]]]
        return out

    while True:  # Later rounds: every unread prefix that can still outscore the answer.
        open_ = np.flatnonzero(~expanded & alive.any(axis=0) & ~np.isnan(partial))
        bound = np.float64(partial[open_])
        needed = np.zeros(len(open_), bool)
        for k in range(len(rankings)):
            needed |= alive[k, open_] & (bound - floor(k, open_) >= best[k, row_of[open_]])
        units = {}
        for flat in open_[needed]:
            r = int(row_of[flat])
            units.setdefault(r, []).append(tries[group[r]].unit(flat - offset[r],
                                                                limit[group[r]]))
        if not units:
            break
        _feed(expand, tries, group, offset, units, partial, expanded, fed, limit)
    ranks = np.zeros((len(rankings), len(group)), np.int64)
    for k, ranking in enumerate(rankings):
        for r in rows:
            trie = tries[group[r]]
            allowed = ranking.allowed[r]
            others = np.arange(len(trie.leaf)) if allowed is None else allowed
            others = others[others != target[r]]
            scores = np.float64(partial[offset[r] + trie.leaf[others]]) - offsets(k, r, others)
            ranks[k, r] = 1 + int(np.sum(scores >= best[k, r]))  # NaN (never fed): below.
    return ranks, fed


def _checked(log_probs: np.ndarray) -> np.ndarray:
    if np.isnan(log_probs).any():
        raise FloatingPointError("Recall scoring: a candidate token's log-probability is NaN "
                                 "(the model's outputs are not finite); a NaN score is never "
                                 "ranked")
    return np.minimum(log_probs, 0.0)


def _feed(expand: Expand, tries, group, offset, units, partial, expanded, fed,
          limit: list[int]) -> None:
    """Feeds each row's units (nodes, and those of them whose children to read) packed into
    chunks of at most `limit[group]` nodes, and adds the children's log-probabilities to the
    partial sums."""
    chunks = []  # (row, nodes in chunk order, nodes read)
    for r, row_units in units.items():
        nodes: dict[int, None] = {}
        new: list[int] = []
        for unit, read in sorted(row_units, key=lambda u: u[1][0]):  # Neighbours share more.
            extra = [int(n) for n in unit if n not in nodes]
            if nodes and len(nodes) + len(extra) > limit[group[r]]:
                chunks.append((r, list(nodes), new))
                nodes, new, extra = {}, [], [int(n) for n in unit]
            nodes.update(dict.fromkeys(extra))
            new.extend(int(n) for n in read)
            expanded[offset[r] + read] = True
        chunks.append((r, list(nodes), new))
    width = max(len(nodes) for _, nodes, _ in chunks)
    reads_per = [sum(int(tries[group[r]].child_count[n]) for n in new) for r, _, new in chunks]
    num_reads = max(reads_per)
    k = len(chunks)
    rows = np.array([r for r, _, _ in chunks], np.int32)
    tokens = np.zeros((k, width), np.int32)
    depth = np.zeros((k, width), np.int32)
    ancestor = np.zeros((k, width, width), bool)
    read_node = np.zeros((k, num_reads), np.int32)
    read_token = np.zeros((k, num_reads), np.int32)
    parents, kids, levels, where = [], [], [], []
    for j, (r, nodes, new) in enumerate(chunks):
        trie = tries[group[r]]
        nodes = np.array(nodes, np.int32)
        position = {int(n): i for i, n in enumerate(nodes)}
        tokens[j, :len(nodes)] = trie.token[nodes]
        depth[j, :len(nodes)] = trie.depth[nodes]
        paths = trie.path[nodes]
        i, d = np.nonzero(paths >= 0)
        ancestor[j, i, [position[int(n)] for n in paths[i, d]]] = True
        fed[r] += len(nodes)
        read = 0
        for n in new:
            for c in trie.children_of(n):
                read_node[j, read] = position[n]
                read_token[j, read] = trie.token[c]
                parents.append(offset[r] + n)
                kids.append(offset[r] + c)
                levels.append(trie.depth[n])
                where.append(j * num_reads + read)
                read += 1
    log_probs = _checked(np.asarray(expand(rows, tokens, depth, ancestor, read_node, read_token)
                                    ).reshape(-1)[where])
    parents, kids, levels = np.array(parents), np.array(kids), np.array(levels)
    for level in np.unique(levels):  # Parents first: a chain's children follow their parents.
        at = levels == level
        partial[kids[at]] = partial[parents[at]] + log_probs[at]

"""Z-matrices built from a molecule's bond graph (openmm.app.Topology bonds).

A Z-matrix has three seed atoms (s0, s1, s2: a bonded chain fixing the reference frame) and one row
(i, j, k, l) per remaining atom: atom i is placed at bond length |ij|, angle i-j-k and torsion i-j-k-l
from atoms placed before it. j is always bonded to i and k to j. Along the backbone spine l is bonded to k
(proper torsions: phi, psi, omega are coordinates). Off the spine, l is an already placed neighbour of j
when there is one ("improper first", as bgmol's templates do: HB2 by HB2-CB-CA-HB1), else a neighbour of
k. So each branching atom is placed relative to its placed siblings: those torsions are narrow and
unimodal, and only the backbone and one torsion per rotor (e.g. one H of each methyl) stay wide.

Construction: a backbone "spine" is laid first (N-CA-C of every amino-acid residue in order, extended at
both ends by the longest heavy-atom branch, which brings in ACE/NME caps or charged termini; without
amino acids, the heavy-atom graph's longest shortest path). The seeds are three consecutive spine atoms in
its middle; the spine is then placed outwards, so every torsion of four consecutive spine atoms (backbone
phi, psi, omega) is a coordinate. Remaining atoms follow heavy atoms first, each from its earliest-placed
neighbours.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ZMatrix:
    """seeds (s0, s1, s2) and rows ((i, j, k, l), ...) in placement order; n_atoms atoms in all."""

    n_atoms: int
    seeds: tuple[int, int, int]
    rows: tuple[tuple[int, int, int, int], ...]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every atom placed exactly once, each from distinct atoms placed before it; else ValueError."""
        if len(set(self.seeds)) != 3:
            raise ValueError(f"Z-matrix seeds must be three distinct atoms, got {self.seeds}")
        placed = set(self.seeds)
        for row in self.rows:
            i, refs = row[0], row[1:]
            if i in placed:
                raise ValueError(f"Z-matrix places atom {i} twice")
            if len(set(row)) != 4 or not set(refs) <= placed:
                raise ValueError(f"Z-matrix row {row}: references must be distinct atoms placed before {i}")
            placed.add(i)
        if placed != set(range(self.n_atoms)):
            missing = sorted(set(range(self.n_atoms)) - placed)[:10]
            raise ValueError(f"Z-matrix does not place atoms {missing} (of {self.n_atoms})")

    @property
    def order(self) -> list[int]:
        """Atoms in placement order (seeds first)."""
        return [*self.seeds, *(row[0] for row in self.rows)]

    def to_config(self) -> dict:
        return {"n_atoms": self.n_atoms, "seeds": list(self.seeds), "rows": [list(r) for r in self.rows]}

    @classmethod
    def from_config(cls, config: dict) -> "ZMatrix":
        return cls(int(config["n_atoms"]), tuple(int(a) for a in config["seeds"]),
                   tuple(tuple(int(a) for a in r) for r in config["rows"]))


def _bfs(adjacency, start, allowed):
    """Parents and distances of a BFS from ``start`` within ``allowed`` atoms (neighbours in index order)."""
    parent, dist, queue = {start: None}, {start: 0}, deque([start])
    while queue:
        a = queue.popleft()
        for b in sorted(adjacency[a]):
            if b in allowed and b not in dist:
                parent[b], dist[b] = a, dist[a] + 1
                queue.append(b)
    return parent, dist


def _path(parent, end):
    out = []
    while end is not None:
        out.append(end)
        end = parent[end]
    return out[::-1]


def _longest_branch(adjacency, start, allowed):
    """Atoms of the longest shortest path from ``start`` into ``allowed`` (excluding start)."""
    parent, dist = _bfs(adjacency, start, allowed | {start})
    far = max(dist, key=lambda a: (dist[a], -a))
    return _path(parent, far)[1:]


def _spine(n_atoms, adjacency, heavy, residues):
    backbone = []
    for names in residues:
        if {"N", "CA", "C"} <= names.keys():
            backbone.extend([names["N"], names["CA"], names["C"]])
    # Keep the first bonded run of backbone atoms (one chain).
    spine = backbone[:1]
    for a in backbone[1:]:
        if a not in adjacency[spine[-1]]:
            break
        spine.append(a)
    heavy_set = {a for a in range(n_atoms) if heavy[a]}
    if len(spine) < 3:
        pool = heavy_set if len(heavy_set) >= 3 else set(range(n_atoms))
        start = min(pool)
        parent, dist = _bfs(adjacency, start, pool)
        u = max(dist, key=lambda a: (dist[a], -a))
        parent, dist = _bfs(adjacency, u, pool)
        v = max(dist, key=lambda a: (dist[a], -a))
        spine = _path(parent, v)
    else:
        free = heavy_set - set(spine)
        head = _longest_branch(adjacency, spine[0], free)
        free -= set(head)
        tail = _longest_branch(adjacency, spine[-1], free)
        spine = head[::-1] + spine + tail
    if len(spine) < 3:
        # e.g. a single heavy atom with hydrogens: grow the chain through any atoms.
        pool = set(range(n_atoms))
        parent, dist = _bfs(adjacency, spine[0], pool)
        far = max(dist, key=lambda a: (dist[a], -a))
        spine = _path(parent, far)
        if len(spine) < 3:
            branch = _longest_branch(adjacency, spine[-1], pool - set(spine))
            spine = spine + branch
    if len(spine) < 3:
        raise ValueError("internal coordinates need a molecule with a chain of at least 3 bonded atoms")
    return spine


def build_zmatrix(n_atoms: int, bonds, heavy=None, residues=None) -> ZMatrix:
    """Z-matrix of a connected molecule.

    Args:
        n_atoms: number of atoms. bonds: iterable of (a, b) atom-index pairs.
        heavy: per-atom bool, True for non-hydrogens (default: all heavy).
        residues: list of {atom name: index} dicts in chain order (for the N-CA-C backbone spine).
    """
    adjacency = [set() for _ in range(n_atoms)]
    for a, b in bonds:
        if a == b or not (0 <= a < n_atoms and 0 <= b < n_atoms):
            raise ValueError(f"bad bond ({a}, {b}) for {n_atoms} atoms")
        adjacency[a].add(b)
        adjacency[b].add(a)
    heavy = [True] * n_atoms if heavy is None else list(heavy)
    _, reach = _bfs(adjacency, 0, set(range(n_atoms)))
    if len(reach) != n_atoms:
        raise ValueError(f"internal coordinates need one connected molecule: atoms "
                         f"{sorted(set(range(n_atoms)) - set(reach))[:10]} are not bonded to atom 0 "
                         "(check the topology's bonds, e.g. CONECT records)")
    spine = _spine(n_atoms, adjacency, heavy, residues or [])
    mid = max(0, (len(spine) - 3) // 2)
    seeds = tuple(spine[mid:mid + 3])
    rank = {a: r for r, a in enumerate(seeds)}
    rows = []

    def place(i, j, k, l):
        rows.append((i, j, k, l))
        rank[i] = len(rank)

    for p in range(mid + 3, len(spine)):  # forward along the spine
        place(spine[p], spine[p - 1], spine[p - 2], spine[p - 3])
    for p in range(mid - 1, -1, -1):  # backward along the spine
        place(spine[p], spine[p + 1], spine[p + 2], spine[p + 3])

    def best(candidates):
        # Heavy atoms first, then the earliest placed.
        return min(candidates, key=lambda a: (not heavy[a], rank[a]))

    while len(rank) < n_atoms:
        frontier = [(not heavy[i], min(rank[j] for j in adjacency[i] if j in rank), i)
                    for i in range(n_atoms) if i not in rank and any(j in rank for j in adjacency[i])]
        _, _, i = min(frontier)
        j = best([a for a in adjacency[i] if a in rank])
        k = best([a for a in adjacency[j] if a in rank and a != i])
        proper = [a for a in adjacency[k] if a in rank and a not in (i, j)]
        improper = [a for a in adjacency[j] if a in rank and a not in (i, k)]
        if not proper and not improper:
            raise ValueError(f"cannot place atom {i}: no torsion reference near atoms {j}, {k}")
        place(i, j, k, best(improper) if improper else best(proper))
    return ZMatrix(n_atoms, seeds, tuple(rows))


def zmatrix_from_topology(topology) -> ZMatrix:
    """Z-matrix from an openmm.app.Topology's bonds (``topology.bonds()``), backbone-first."""
    n_atoms = topology.getNumAtoms()
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    if not bonds and n_atoms > 1:
        raise ValueError("the topology has no bonds: load it from a PDB with CONECT records or call "
                         "topology.createStandardBonds()")
    heavy = [a.element is None and not a.name.upper().startswith("H") or
             (a.element is not None and a.element.symbol != "H") for a in topology.atoms()]
    residues = [{a.name: a.index for a in res.atoms()} for res in topology.residues()]
    return build_zmatrix(n_atoms, bonds, heavy, residues)

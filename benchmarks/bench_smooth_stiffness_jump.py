"""Issue-12 diagnosis (c)+(d): one NVE trajectory at 1 fs (trajectory index as in bench_smooth_stiffness_nve.py); at
the largest single-step change of E_tot (and 3 steps before, 1 after): Hessian by term, omega_max, the coordinates
of the stiffest and the most negative mode, and the largest |z|.

    DATASET=md.h5 OMP_NUM_THREADS=1 python benchmarks/bench_smooth_stiffness_jump.py FLOW.pt TRAJ STEPS
"""
import os, sys, numpy as np, torch
torch.set_num_threads(1)
from regflow_mm.data import load_dataset
from regflow_mm.flows import load_flow
from regflow_mm.representations.internal import _wrap
flow = load_flow(sys.argv[1]).eval()
traj, nsteps = int(sys.argv[2]), int(sys.argv[3])
data = load_dataset(os.environ.get('DATASET', 'md.h5')); aldp = data.system
test = data.split_indices('test')
x0 = torch.as_tensor(data.positions[test[:4 * 200:200]], dtype=torch.float64)
m = torch.tensor([aldp.system.getParticleMass(i)._value for i in range(22)], dtype=torch.float64)[None, :, None]
kT = flow.kT
g = torch.Generator().manual_seed(0)
v0 = torch.randn(x0.shape, generator=g, dtype=torch.float64) * (kT / m).sqrt()
v0 = v0 - (v0 * m).sum(1, keepdim=True) / m.sum()
x, v = x0[traj:traj + 1].clone(), v0[traj:traj + 1].clone()
rep = flow.representation
nb, na = rep.n_bonds, rep.n_angles
names = []
for k in range(rep.dim):
    if k < nb: names.append(f"bond {int(rep._bond_i[k])}-{int(rep._bond_j[k])}")
    elif k < nb + na: j = k - nb; names.append(f"angle {int(rep._angle_i[j])}-{int(rep._angle_j[j])}-{int(rep._angle_k[j])}")
    else: j = k - nb - na; names.append(f"tors {'-'.join(str(int(a)) for a in rep._rows[j])}{'c' if rep.circular_torsions[j] else 'n'}")
def zvals(x):
    b, a, t = rep.internal(x)
    z, circ, _ = rep._open_z(b, a, _wrap(t - rep.torsion_offset))
    return torch.where(circ, 0.0, z)[0].detach().numpy()
dt = 1e-3
e, f = flow.energy_and_forces(x)
E, X = [], []
for s in range(nsteps):
    E.append(float(e) + float(0.5 * (m * v * v).sum())); X.append(x.clone())
    v = v + 0.5 * dt * f / m; x = x + dt * v
    e, f = flow.energy_and_forces(x)
    v = v + 0.5 * dt * f / m
E = np.array(E); dE = np.diff(E)
k = int(np.argmax(np.abs(dE)))
print(f"traj {traj}: E_tot[0] {E[0]:.2f}, largest |dE| {dE[k]:+.2f} kJ/mol at step {k}->{k+1}; E every 10: {np.round(E[::10] - E[0], 2).tolist()}")
mw = (m[0, :, 0].repeat_interleave(3).numpy()) ** -0.5
for s in sorted({max(k - 3, 0), k, k + 1}):
    xs = X[s].reshape(-1)
    z = zvals(X[s])
    top = np.argsort(-np.abs(z))[:4]
    def term(y, which):
        u, ld_rep = rep.to_flow_space(y.reshape(1, 22, 3))
        _, ld_t = flow.transform(u, inverse=True)
        return -kT * (ld_rep if which == 0 else ld_t)[0]
    parts = [torch.autograd.functional.hessian(lambda y, w=w: term(y, w), xs).numpy() for w in (0, 1)]
    out = []
    for name, H in (("total", parts[0] + parts[1]), ("rep", parts[0]), ("transform", parts[1])):
        ev, vec = np.linalg.eigh(mw[:, None] * H * mw[None, :])
        out.append((name, ev, vec))
    ev, vec = out[0][1], out[0][2]
    print(f" step {s}: |z| top " + ", ".join(f"{names[i]} {z[i]:+.2f}" for i in top)
          + "; omega_max " + ", ".join(f"{n} {np.sqrt(max(e_[-1], 0)):.0f}" for n, e_, _ in out)
          + "; lam_min " + ", ".join(f"{n} {e_[0]:.3g}" for n, e_, _ in out))
    xx = X[s].clone().requires_grad_(True)
    u, _ = rep.to_flow_space(xx)
    J = torch.stack([torch.autograd.grad(u[0, c], xx, retain_graph=True)[0].reshape(-1) for c in range(rep.dim)]).numpy()
    for idx in (-1, 0):
        du = J @ (mw * vec[:, idx])
        o = np.argsort(-np.abs(du))[:3]
        print(f"   mode lam {ev[idx]:.3g}: du " + ", ".join(f"{names[c]} {du[c]:+.2f} (u={float(u[0, c]):.4f})" for c in o))
    sys.stdout.flush()

"""Issue-12 diagnosis (b)+(c): mass-weighted Hessian of -kT log q by autograd (total, representation and transform
terms) against the force field (central differences of its forces) on N test frames (every 400th), omega_max,
and the internal coordinates carrying the top modes.

    DATASET=md.h5 OMP_NUM_THREADS=1 python benchmarks/bench_smooth_stiffness_hess.py FLOW.pt N
"""
import os, sys, numpy as np, torch, openmm
torch.set_num_threads(1)
from regflow_mm.data import load_dataset
from regflow_mm.flows import load_flow
from regflow_mm.representations.internal import _wrap
flow = load_flow(sys.argv[1]).eval()
data = load_dataset(os.environ.get('DATASET', 'md.h5')); aldp = data.system
test = data.split_indices('test')
frames = [int(i) for i in test[:int(sys.argv[2]) * 400:400]]
m = np.array([aldp.system.getParticleMass(i)._value for i in range(22)])
mw = np.repeat(m, 3) ** -0.5
rep = flow.representation
kT = flow.kT
def terms(xf):
    x = xf.reshape(1, 22, 3)
    u, ld_rep = rep.to_flow_space(x)
    z, ld_t = flow.transform(u, inverse=True)
    lp = flow.prior.log_prob(z) if hasattr(flow.prior, 'log_prob') else 0 * ld_t
    return -kT * ld_rep[0], -kT * ld_t[0], -kT * lp[0]
def hess(fn, x):
    return torch.autograd.functional.hessian(fn, x).numpy()
ctx = openmm.Context(aldp.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName('Reference'))
def ff_forces(x):
    ctx.setPositions(x.reshape(22, 3)); return ctx.getState(getForces=True).getForces(asNumpy=True)._value.reshape(-1)
names = []
nb, na = rep.n_bonds, rep.n_angles
for k in range(rep.dim):
    if k < nb: names.append(f"bond {int(rep._bond_i[k])}-{int(rep._bond_j[k])}")
    elif k < nb + na: j = k - nb; names.append(f"angle {int(rep._angle_i[j])}-{int(rep._angle_j[j])}-{int(rep._angle_k[j])}")
    else: j = k - nb - na; names.append(f"tors {'-'.join(str(int(a)) for a in rep._rows[j])}{' (circ)' if rep.circular_torsions[j] else ''}")
elems = [a.element.symbol for a in aldp.topology.atoms()]
print('atoms', ''.join(f'{i}{e} ' for i, e in enumerate(elems)))
for fr in frames:
    x = torch.as_tensor(data.positions[fr], dtype=torch.float64).reshape(-1)
    out = {}
    parts = [hess(lambda y, k=k: terms(y)[k], x) for k in range(3)]
    H = sum(parts)
    for name, Hp in (('flow', H), ('rep', parts[0]), ('transform', parts[1]), ('prior', parts[2])):
        ev = np.linalg.eigvalsh(mw[:, None] * Hp * mw[None, :])
        out[name] = (ev.max(), ev.min())
    # force field by central differences of forces
    h = 1e-5; x0 = x.numpy()
    Hf = np.zeros((66, 66))
    for i in range(66):
        xp = x0.copy(); xp[i] += h; xm = x0.copy(); xm[i] -= h
        Hf[:, i] = -(ff_forces(xp) - ff_forces(xm)) / (2 * h)
    Hf = 0.5 * (Hf + Hf.T)
    evf = np.linalg.eigvalsh(mw[:, None] * Hf * mw[None, :])
    Hm = mw[:, None] * H * mw[None, :]
    ev, vec = np.linalg.eigh(Hm)
    w = np.sqrt(np.clip(ev, 0, None))  # rad/ps
    wf = np.sqrt(np.clip(evf, 0, None))
    print(f"frame {fr}: omega_max flow {w[-1]:.0f} rad/ps (omega dt at 1 fs {w[-1]*1e-3:.3f}), force field {wf[-1]:.0f} ({wf[-1]*1e-3:.3f}); "
          f"neg eig flow {ev.min():.3g} ff {evf.min():.3g}; top 5 flow {np.sqrt(np.clip(ev[-5:],0,None)).round(0)}, ff {wf[-5:].round(0)}")
    print("   lam_max (1/ps^2) by term:", {k: f"{v[0]:.3g} / min {v[1]:.3g}" for k, v in out.items()})
    # which internal coordinates carry the top mode: displacement of x along the eigenvector (Cartesian = mw * vec)
    for top in (1, 2, 3):
        dx = torch.as_tensor(mw * vec[:, -top])
        xx = x.reshape(1, 22, 3).clone().requires_grad_(True)
        u, _ = rep.to_flow_space(xx)
        J = torch.stack([torch.autograd.grad(u[0, k], xx, retain_graph=True)[0].reshape(-1) for k in range(rep.dim)])
        du = (J @ dx).numpy()
        order = np.argsort(-np.abs(du))[:3]
        atoms = np.argsort(-np.abs(dx.numpy().reshape(22, 3)).sum(1))[:3]
        print(f"   mode {top} omega {w[-top]:.0f}: du " + ", ".join(f"{names[k]} {du[k]:+.3f}" for k in order) + f"; atoms {atoms.tolist()}")
    sys.stdout.flush()

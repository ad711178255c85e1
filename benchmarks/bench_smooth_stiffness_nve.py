"""Issue-12 diagnosis (a)+(d): batched velocity-Verlet NVE on a flow potential from 4 test frames (0, 200, 400, 600
of the test split), Maxwell-Boltzmann velocities at 300 K (seed 0), at several timesteps; prints std E_tot/DOF,
drift, the largest single-step change of E_tot and max |z| of the open-support coordinates.

    DATASET=md.h5 [SAVE_DIR=dir] OMP_NUM_THREADS=1 python benchmarks/bench_smooth_stiffness_nve.py FLOW.pt PS DT_FS[,DT_FS...]
"""
import os, sys, time, math, numpy as np, torch
torch.set_num_threads(1)
from regflow_mm.data import load_dataset
from regflow_mm.flows import load_flow
flow = load_flow(sys.argv[1]).eval()
data = load_dataset(os.environ.get('DATASET', 'md.h5')); aldp = data.system
ps = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
dts = [float(v) for v in sys.argv[3].split(',')] if len(sys.argv) > 3 else [1.0, 0.5, 0.25]
B = 4
test = data.split_indices('test')
x0 = torch.as_tensor(data.positions[test[:B * 200:200]], dtype=torch.float64)
m = torch.tensor([aldp.system.getParticleMass(i)._value for i in range(22)], dtype=torch.float64)[None, :, None]
kT = flow.kT
g = torch.Generator().manual_seed(0)
v0 = torch.randn(x0.shape, generator=g, dtype=torch.float64) * (kT / m).sqrt()
v0 = v0 - (v0 * m).sum(1, keepdim=True) / m.sum()
rep = flow.representation
def zmax(x):
    with torch.no_grad():
        b, a, t = rep.internal(x)
        from regflow_mm.representations.internal import _wrap
        z, circ, _ = rep._open_z(b, a, _wrap(t - rep.torsion_offset))
        z = torch.where(circ, 0.0, z).abs()
        v, i = z.max(1)
        return v, i
for dt_fs in dts:
    dt = dt_fs * 1e-3
    n = int(round(ps / dt))
    x, v = x0.clone(), v0.clone()
    e, f = flow.energy_and_forces(x)
    E = []; Z = []; t0 = time.time()
    for s in range(n + 1):
        ke = 0.5 * (m * v * v).sum((1, 2))
        E.append((e.detach() + ke).numpy()); 
        if s % 10 == 0: Z.append(zmax(x)[0].numpy())
        if s == n: break
        v = v + 0.5 * dt * f / m
        x = x + dt * v
        e, f = flow.energy_and_forces(x)
        v = v + 0.5 * dt * f / m
    E = np.array(E); Z = np.array(Z)
    std = E.std(0) / 60
    jumps = np.abs(np.diff(E, axis=0))
    print(f"dt {dt_fs} fs, {n} steps, {time.time()-t0:.0f}s: std E/DOF per traj {np.round(std, 4)}; drift {np.round(E[-1]-E[0], 2)}; "
          f"max |dE| step {jumps.max(0).round(2)} at step {jumps.argmax(0)}; max|z| {Z.max(0).round(2)}", flush=True)
    if os.environ.get('SAVE_DIR'):  # E_tot per step and trajectory, for plots
        np.save(os.path.join(os.environ['SAVE_DIR'], f'E_{dt_fs}.npy'), E)

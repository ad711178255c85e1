"""`regflow-mm systems`, `simulate`, `dataset-info`, `export-traj`."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("systems", help="list the built-in systems")
    p.set_defaults(func=_systems)

    p = subparsers.add_parser("simulate", help="run MD into an HDF5 dataset (resumes if it exists)")
    p.add_argument("system", help="built-in name (aldp, al3, al4) or a system spec .toml")
    p.add_argument("--ns", type=float, required=True, help="total production length, ns")
    p.add_argument("--out", required=True, help="dataset file (.h5); rerun the same command to resume")
    p.add_argument("--save-interval-ps", type=float, default=1.0, help="ps between saved frames (default 1)")
    p.add_argument("--timestep-fs", type=float, default=1.0, help="integration step, fs (default 1)")
    p.add_argument("--friction", type=float, default=None, help="Langevin friction, 1/ps (default: the system's)")
    p.add_argument("--hydrogen-mass", type=float, default=None,
                   help="hydrogen mass repartitioning, amu (e.g. 3 with --timestep-fs 2: the same ensemble at twice "
                        "the ns per CPU-second; default: the force field's masses)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the velocities and Langevin noise: one seed reproduces the run (0 is a seed too)")
    p.add_argument("--platform", default="auto", help="OpenMM platform: auto (default), Reference, CPU, CUDA, OpenCL")
    p.add_argument("--threads", type=int, default=1, help="CPU platform threads (default 1)")
    p.add_argument("--equilibration-ps", type=float, default=10.0, help="unsaved MD before production, ps (default 10)")
    p.add_argument("--chunk-frames", type=int, default=100, help="frames written per chunk (at most this many are lost on a kill)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of frames for validation, in [0, 1) (default 0.1), drawn as --val-blocks blocks across the run")
    p.add_argument("--val-blocks", type=int, default=10,
                   help="validation blocks spread over the run before the test block (default 10; 1: one block)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="fraction of frames in the final, held-out test block, in [0, 1) (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("enhanced sampling (frames store log-weights to the unbiased ensemble)")
    g.add_argument("--enhanced", choices=["none", "metadynamics", "tempering"], default="none",
                   help="metadynamics: well-tempered, on backbone torsions (OpenMM's Metadynamics; --metad-*); "
                        "tempering: parallel tempering, frames of the system-temperature replica (openmmtools; --pt-*)")
    g.add_argument("--metad-torsions", default="phi1,psi1", help="comma-separated torsion names (default phi1,psi1)")
    g.add_argument("--metad-bias-factor", type=float, default=6.0, help="bias factor gamma > 1 (default 6)")
    g.add_argument("--metad-height", type=float, default=1.2, help="initial Gaussian height, kJ/mol (default 1.2)")
    g.add_argument("--metad-width", type=float, default=0.35, help="Gaussian width, rad (default 0.35)")
    g.add_argument("--metad-deposition-ps", type=float, default=1.0, help="ps between Gaussians (default 1)")
    g.add_argument("--metad-grid-points", type=int, default=72,
                   help="bias grid points per torsion (default 72; 36 keeps 3-torsion runs fast)")
    g.add_argument("--pt-replicas", type=int, default=4, help="temperatures on the geometric ladder (default 4)")
    g.add_argument("--pt-max-temperature", type=float, default=600.0,
                   help="top of the ladder, K (default 600; the bottom is the system's temperature)")
    p.set_defaults(func=_simulate)

    p = subparsers.add_parser("dataset-info", help="print a dataset's summary")
    p.add_argument("dataset")
    p.set_defaults(func=_info)

    p = subparsers.add_parser("export-traj", help="write a dataset as DCD/XTC/PDB for VMD or PyMOL")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="output file: .dcd, .xtc or .pdb (.h5 with PyTables installed)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"])
    p.set_defaults(func=_export)


def _systems(args) -> int:
    from ..systems import get_system, list_systems

    for name in list_systems():
        s = get_system(name)
        print(f"{name:6s} {s.n_atoms:3d} atoms  {s.temperature:.0f} K  {' + '.join(s.spec.forcefield)}  "
              f"{s.spec.nonbonded_method}  torsions: {', '.join(s.torsions)}")
    return 0


def _simulate(args) -> int:
    from ..systems import get_system
    from .dataset import load_dataset
    from .simulate import simulate

    system = get_system(args.system)
    enhanced = None
    if args.enhanced == "metadynamics":
        from .metadynamics import MetadynamicsSettings

        enhanced = MetadynamicsSettings(torsions=args.metad_torsions,
                                        bias_factor=args.metad_bias_factor, height_kJ=args.metad_height,
                                        width_rad=args.metad_width, deposition_ps=args.metad_deposition_ps,
                                        grid_points=args.metad_grid_points)
    elif args.enhanced == "tempering":
        from .tempering import TemperingSettings

        enhanced = TemperingSettings(n_replicas=args.pt_replicas, t_max_K=args.pt_max_temperature)
    out = simulate(system, args.out, ns=args.ns, save_interval_ps=args.save_interval_ps,
                   timestep_fs=args.timestep_fs, friction_per_ps=args.friction, seed=args.seed,
                   platform=args.platform, threads=args.threads, equilibration_ps=args.equilibration_ps,
                   chunk_frames=args.chunk_frames, val_fraction=args.val_fraction, val_blocks=args.val_blocks,
                   test_fraction=args.test_fraction, progress=not args.quiet, enhanced=enhanced,
                   hydrogen_mass_amu=args.hydrogen_mass)
    print(load_dataset(out, system).summary())
    return 0


def _info(args) -> int:
    from .dataset import load_dataset

    print(load_dataset(args.dataset).summary())
    return 0


def _export(args) -> int:
    from .simulate import export_trajectory

    print(f"wrote {export_trajectory(args.dataset, args.out, args.split)}")
    return 0

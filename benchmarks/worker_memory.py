"""Private memory a forked data-loader worker gains by touching every row of a speech manifest
once (one epoch), for the rows as the dataset keeps them (numpy arrays) and as a list of
per-row Python objects. Usage: python benchmarks/worker_memory.py MANIFEST.tsv (--write N: first
write a manifest of N rows pointing at files that need not exist)."""
import os, sys
import numpy as np
from d2v_plugin.data.audio_dataset import AudioManifestDataset, read_manifest

def private_kb():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Private_Dirty"):
            return int(line.split()[1])

manifest = sys.argv[1]
if len(sys.argv) == 4 and sys.argv[2] == "--write":
    sizes = np.random.default_rng(0).integers(16_000, 320_000, int(sys.argv[3]))
    with open(manifest, "w") as f:
        f.write("/nonexistent\n" + "".join(f"spk{i % 1000}/utt{i:07d}.flac\t{n}\n" for i, n in enumerate(sizes)))
ds = AudioManifestDataset(manifest, check_files=False)
for label, rows in (("numpy rows (ManifestRows)", ds.rows), ("list of ManifestRow", read_manifest(manifest)[1])):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_kb()
        for i in range(len(rows)):
            row = rows[i]
            _ = (row.path, row.num_samples)
        os.write(w, str(private_kb() - before).encode()); os._exit(0)
    os.waitpid(pid, 0)
    print(f"{label}: {len(rows)} rows, worker private memory +{int(os.read(r, 100)) / 1024:.1f} MiB after one pass")

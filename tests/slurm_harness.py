"""A real single-node Slurm for tests: munged, slurmctld and slurmd, started as root in the
foreground as children of the test process (so their PIDs are known) and stopped by those PIDs.

Everything lives in one private directory: slurm.conf and gres.conf (found by every Slurm command
through ``SLURM_CONF``), state, spool, logs, and a munged of its own on its own socket and key,
so a system munged or Slurm is left alone. The ports are free ones picked at start. Debian 12
(slurm-wlm 22.05); no slurmdbd, so job status comes from ``squeue`` and MinJobAge is long
enough (600 s) for finished jobs to stay visible there.

One exception: /etc/slurm/slurm.conf becomes a symlink to our slurm.conf while the cluster runs
(removed by ``stop()``). The executor's job step (snakemake-executor-plugin-slurm-jobstep)
strips every SLURM_* variable, SLURM_CONF included, before its nested ``srun``, which then only
finds the default path. An existing /etc/slurm/slurm.conf that is not ours is never replaced:
``start()`` raises instead.
"""

import grp
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurm-client", "munge")
BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "srun", "squeue",
            "sinfo", "scontrol", "scancel")
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


def _path():
    return f"{os.environ.get('PATH', '')}{os.pathsep}{SBIN}"


def missing_binaries():
    return [b for b in BINARIES if shutil.which(b, path=_path()) is None]


def unavailable_reason(install=True, timeout=600):
    """None if a local Slurm can be started here, else why not (for pytest.skip).

    Missing packages are installed with apt-get when ``install`` and we are root."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (munged, slurmd and fake GPU devices)"
    if missing_binaries() and install and shutil.which("apt-get", path=_path()):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=_path())
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True,
                           timeout=timeout)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                            *PACKAGES], env=env, capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            pass
    missing = missing_binaries()
    if missing:
        return (f"Slurm binaries missing ({', '.join(missing)}) and apt-get could not install "
                f"{' '.join(PACKAGES)}")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    if SYSTEM_CONF.exists():
        return f"{SYSTEM_CONF} exists (a real Slurm is configured here): not replacing it"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pid(process, wait=15.0):
    """SIGTERM one of our children, then SIGKILL if it outlives ``wait`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class LocalSlurm:
    """``start()`` brings the cluster up (a few seconds), ``stop()`` takes it down by PID.

    ``env`` is the environment for Slurm clients and for snakemake: SLURM_CONF and a PATH that
    reaches /usr/sbin. ``fake_gpus`` GPUs are advertised as GRES ``gpu``, backed by char devices
    (slurmd drops GPUs whose File is not a char device)."""

    def __init__(self, fake_gpus=1, min_job_age=600, base=None):
        self.fake_gpus = fake_gpus
        self.min_job_age = min_job_age
        self.base = Path(base or tempfile.mkdtemp(prefix="cm-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.procs = {}
        self.conf = self.base / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PATH=_path())
        self.env.pop("SLURM_JOB_ID", None)
        self.startup_seconds = None
        self.linked_conf = None

    # -- configuration -------------------------------------------------------------------------
    def _write_config(self):
        base = self.base
        base.chmod(0o755)  # munged runs as user munge and must reach base/munge
        for sub in ("state", "spool", "log", "dev"):
            (base / sub).mkdir(exist_ok=True)
        munge_dir = base / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # clients need x on the socket's directory
        uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (munge_dir, key):
            os.chown(p, uid, gid)
        self.munge_socket = munge_dir / "munge.socket"

        mem_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
        gres_node = gres_types = ""
        if self.fake_gpus:
            files = []
            for i in range(self.fake_gpus):
                dev = base / "dev" / f"fakegpu{i}"
                try:  # a clone of /dev/null
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                    files.append(str(dev))
                except OSError:
                    if self.fake_gpus != 1:
                        raise
                    files.append("/dev/null")  # a char device too; enough for one GPU
            (base / "gres.conf").write_text(
                "".join(f"NodeName={self.host} Name=gpu File={f}\n" for f in files))
            gres_node, gres_types = f"Gres=gpu:{self.fake_gpus}", "GresTypes=gpu"
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=cmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge={self.min_job_age}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MpiDefault=none
{gres_types}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} {gres_node} \
State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name, args, **kwargs):
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, **kwargs)
        log.close()

    def _wait(self, what, check, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) while waiting for "
                                       f"{what}:\n{self.logs()}")
            if check():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def run(self, *args, timeout=30):
        return subprocess.run(args, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def _link_system_conf(self):
        conf = SYSTEM_CONF
        if conf.is_symlink() and "cm-slurm-" in os.readlink(conf) and not conf.exists():
            conf.unlink()  # left behind by a harness that was killed
        if conf.exists() or conf.is_symlink():
            raise RuntimeError(f"{conf} exists and is not ours: not starting a test Slurm")
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.symlink_to(self.conf)
        self.linked_conf = conf

    def start(self, timeout=60):
        t0 = time.monotonic()
        self._write_config()
        self._link_system_conf()
        munge_dir = self.munge_socket.parent
        self._spawn("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}",
        ], user="munge", group="munge", extra_groups=[])
        self._wait("munged", lambda: self.munge_socket.exists() and subprocess.run(
            f"munge -n --socket={self.munge_socket} | unmunge --socket={self.munge_socket}",
            shell=True, env=self.env, capture_output=True).returncode == 0, timeout)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait("slurmctld", lambda: "UP" in self.run("scontrol", "ping").stdout, timeout)
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.host])

        def node_ready():
            state = self.run("sinfo", "-h", "-n", self.host, "-o", "%t").stdout.strip()
            if state.startswith(("down", "drain", "drng")):
                self.run("scontrol", "update", f"NodeName={self.host}", "State=RESUME")
            return state in ("idle", "mix", "alloc")

        self._wait("the node to be idle", node_ready, timeout)
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self, remove=True):
        """Cancel what is left in the queue, then stop slurmd, slurmctld and munged by PID."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                ids = self.run("squeue", "-h", "-t", "PD,R,CG", "-o", "%i").stdout.split()
                if ids:
                    self.run("scancel", *ids)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and self.run(
                            "squeue", "-h", "-t", "PD,R,CG", "-o", "%i").stdout.strip():
                        time.sleep(0.5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            _stop_pid(self.procs.get(name))
        self.procs.clear()
        link = self.linked_conf
        if link is not None and link.is_symlink() and os.readlink(link) == str(self.conf):
            link.unlink()
        self.linked_conf = None
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- inspection ----------------------------------------------------------------------------
    def jobs(self):
        """Every job slurmctld still remembers: {id: (name, comment, state)}."""
        out = self.run("squeue", "-h", "--states=all", "-o", "%i|%j|%k|%T").stdout
        rows = (line.split("|") for line in out.splitlines() if line.strip())
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def logs(self, tail=30):
        parts = []
        for f in sorted((self.base / "log").glob("*")) + [self.base / "munge" / "munged.log"]:
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

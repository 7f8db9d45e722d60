#!/usr/bin/python3
"""The host side of vm/powercut.sh: the workload that runs against the vpool
daemon inside the VM until the VM's power is cut, and the checker that runs
after the next boot. Needs python3-libnbd (the `nbd` module); Debian's
/usr/bin/python3 has it when libnbd's Python bindings are installed.

  powercut-client.py wait   --api PORT --token FILE [--timeout S] [--qemu-pid PID]
  powercut-client.py init   --api PORT --token FILE --state DIR --sectors N
  powercut-client.py work   --nbd PORT --api PORT --token FILE --log FILE --seed N --round R
  powercut-client.py check  --nbd PORT --api PORT --token FILE --state DIR --log FILE
  powercut-client.py selftest      (the oracle against made-up histories, no VM)

The volume is `crash`, SECTORS 512-byte sectors. Every sector written holds
32 copies of the 16-byte unit (tag, sector number), so a sector read back
names the write it came from and where it belongs; tag 0 is zeros (a
write-zeroes, or never written). Tags are (round << 32) + n: unique for the
whole run.

The work log (one line each, written and flushed before the request is sent
or after its reply arrived, so it is a true order of events as the client saw
them; line numbers identify requests):

  ready                       connected
  W tag start n | Z start n   about to send a write / write-zeroes
  A id | AF id                acknowledged (AF: sent with FUA), id = line of the W/Z
  FS k | FD k                 flush k sent (logged just after aio_flush) / completed
  SS name | SD name | SE name snapshot create sent / returned OK / failed
  XS name | XD name | XE name snapshot delete sent / returned OK / failed
  error ... | timeout | BUG ...   how the client ended

The oracle (checked at the next boot, for every sector s of the volume):
let writes[s] be the writes sent to s this round, in order (never two in
flight on one sector, so this is the order they took effect), base[s] the
sector's tag read back (and checked) at the start of the round. A write is
*durable* when it was acknowledged with FUA, or acknowledged before a flush
was sent that then completed, or before a snapshot create was sent that then
returned (vpool's snapshot create flushes, and its record follows those
writes in the log). With d the last durable write to s, s must hold d or a
later write to s; with none durable, base[s] or any write to s. Anything else
(an older value, another sector's data, a torn sector, garbage) is a failure.
A failure because a durable write is missing is reported as LOST-FLUSHED.

Then the prefix rule (vpool's log is cut at the first hole after a crash, so
the pool is as it was at one moment): if any write of this round is seen, let
w be the one sent last; every write acknowledged before w was sent must be
there too, as if a flush had covered it. A failure of this rule is reported
as NOT-A-PREFIX. (A sector can show w's data through a later record that
read-modify-wrote its 4 KiB block; that record comes after w in the log, so
the rule holds all the same.)

Snapshots: every snapshot whose create returned must be there, unless a
delete of it returned; a snapshot whose delete returned must not be there;
a snapshot whose create or delete was in flight may or may not be. A
snapshot's sector must hold a value the volume's sector had while the create
was in flight: the last write acknowledged before it was sent (base if none)
or a later write sent before it returned. Once checked, a snapshot's content
is kept in the state directory and must never change.
"""

import argparse
import array
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request

VOLUME = "crash"
SECTOR = 512
HOT = 128  # the first 128 sectors (16 blocks) get many small writes

# Exit codes of `check`.
EXIT_OK = 0
EXIT_FAIL = 1  # the pool did not open, the volume is gone, garbage, ...
EXIT_LOST = 3  # flushed writes lost (and maybe more)


def die(msg, code=EXIT_FAIL):
    print("powercut-client: FAIL: %s" % msg, file=sys.stderr, flush=True)
    sys.exit(code)


def sector_bytes(tag, s):
    return struct.pack("<QQ", tag, s) * 32 if tag else bytes(SECTOR)


def decode_sector(data, s):
    """The tag a sector holds, or None if it is not zeros nor one whole write."""
    tag = struct.unpack_from("<Q", data, 0)[0]
    if tag == 0:
        return 0 if data == bytes(SECTOR) else None
    return tag if data == sector_bytes(tag, s) else None


# ----------------------------------------------------------------- API


class Api:
    def __init__(self, port, token_file, timeout=120):
        self.base = "http://127.0.0.1:%d" % port
        with open(token_file) as f:
            self.token = f.read().strip()
        self.timeout = timeout

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", "Bearer " + self.token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            text = r.read()
        return json.loads(text) if text.strip() else None

    def snapshots(self):
        return [s["name"] for s in self.call("GET", "/v1/volumes/%s/snapshots" % VOLUME)["snapshots"]]


def nbd_connect(port, export):
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_tcp("127.0.0.1", str(port))
    return h


def read_all(port, export, sectors):
    """The whole export, read 1 MiB at a time, 4 reads in flight."""
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_tcp("127.0.0.1", str(port))
    size = h.get_size()
    if size != sectors * SECTOR:
        raise RuntimeError("export %s has %d bytes, want %d" % (export, size, sectors * SECTOR))
    out = bytearray(size)
    chunk = 1 << 20
    pending = []
    off = 0
    while off < size or pending:
        while off < size and len(pending) < 4:
            n = min(chunk, size - off)
            buf = nbd.Buffer(n)
            pending.append((h.aio_pread(buf, off), off, buf))
            off += n
        h.poll(-1)
        for item in list(pending):
            c, o, buf = item
            if h.aio_command_completed(c):
                out[o:o + len(buf)] = buf.to_bytearray()
                pending.remove(item)
    h.shutdown()
    return bytes(out)


# ----------------------------------------------------------------- state


class State:
    """What the checker knows between rounds, in DIR:
    meta.json  {"sectors": N, "snapshots": {name: "known"|"deleted"}}
    base.bin   the volume's tags as checked at the start of the round
    snap-NAME.bin  a checked snapshot's tags"""

    def __init__(self, d):
        self.dir = d
        with open(os.path.join(d, "meta.json")) as f:
            self.meta = json.load(f)
        self.sectors = self.meta["sectors"]

    @staticmethod
    def create(d, sectors):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"sectors": sectors, "snapshots": {}}, f)
        State.save_tags(os.path.join(d, "base.bin"), [0] * sectors)

    def save(self):
        tmp = os.path.join(self.dir, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "meta.json"))

    @staticmethod
    def save_tags(path, tags):
        with open(path + ".tmp", "wb") as f:
            array.array("Q", tags).tofile(f)
        os.replace(path + ".tmp", path)

    @staticmethod
    def load_tags(path, n):
        a = array.array("Q")
        with open(path, "rb") as f:
            a.fromfile(f, n)
        return list(a)


# ----------------------------------------------------------------- oracle


class Model:
    """The work log of one round replayed: what each sector, and each
    snapshot, may hold after the power cut."""

    def __init__(self, base, log_text):
        n = len(base)
        self.base = base
        self.writes = [[] for _ in range(n)]  # tags sent to each sector, in order
        self.durable = [0] * n  # how many of writes[s] are known durable
        acked_n = [0] * n  # how many of writes[s] were acknowledged
        sent = {}  # line of W/Z -> (start, [index in writes[s] per sector])
        acked = []  # acknowledged requests (W/Z lines), in order
        self.ack_lines = []  # the line of each acknowledgement in `acked`
        self.sent = sent
        self.acked = acked
        self.tag_line = {}  # tag -> line of its W
        self.snap_lo = {}  # name -> acked_n when its create was sent
        self.snap_hi = {}  # name -> len(writes[s]) when it returned
        self.snap_state = {}  # name -> "sent" | "done" | "failed"
        self.del_state = {}  # name -> "sent" | "done" | "failed"
        self.snaps_created = []  # names with SS, in order
        barrier_at = {}  # ("F", k) / ("S", name) -> len(acked) when sent
        covered = 0
        self.counts = {"sent": 0, "acked": 0, "flushes": 0, "snapshots": 0, "deletes": 0}
        self.end = "(no end line: the client died)"

        def make_durable(upto):
            nonlocal covered
            if upto <= covered:
                return
            for req in acked[covered:upto]:
                start, idx = sent[req]
                for i, k in enumerate(idx):
                    s = start + i
                    if self.durable[s] < k + 1:
                        self.durable[s] = k + 1
            covered = upto

        for lineno, line in enumerate(log_text.splitlines()):
            f = line.split()
            if not f:
                continue
            kind = f[0]
            if kind == "ready":
                continue
            if kind in ("W", "Z"):
                if kind == "W":
                    tag, start, cnt = int(f[1]), int(f[2]), int(f[3])
                else:
                    tag, start, cnt = 0, int(f[1]), int(f[2])
                if start + cnt > n:
                    raise ValueError("a request past the end: %s" % line)
                idx = []
                for s in range(start, start + cnt):
                    self.writes[s].append(tag)
                    idx.append(len(self.writes[s]) - 1)
                sent[lineno] = (start, idx)
                if tag:
                    self.tag_line[tag] = lineno
                self.counts["sent"] += 1
            elif kind in ("A", "AF"):
                req = int(f[1])
                start, idx = sent[req]
                for i, k in enumerate(idx):
                    acked_n[start + i] = k + 1
                acked.append(req)
                self.ack_lines.append(lineno)
                self.counts["acked"] += 1
                if kind == "AF":
                    # FUA: this write alone is durable.
                    for i, k in enumerate(idx):
                        s = start + i
                        if self.durable[s] < k + 1:
                            self.durable[s] = k + 1
            elif kind == "FS":
                barrier_at[("F", f[1])] = len(acked)
            elif kind == "FD":
                make_durable(barrier_at[("F", f[1])])
                self.counts["flushes"] += 1
            elif kind == "SS":
                name = f[1]
                barrier_at[("S", name)] = len(acked)
                self.snap_lo[name] = list(acked_n)
                self.snap_state[name] = "sent"
                self.snaps_created.append(name)
            elif kind == "SD":
                name = f[1]
                make_durable(barrier_at[("S", name)])
                self.snap_hi[name] = [len(w) for w in self.writes]
                self.snap_state[name] = "done"
                self.counts["snapshots"] += 1
            elif kind == "SE":
                self.snap_state[f[1]] = "failed"
            elif kind == "XS":
                self.del_state[f[1]] = "sent"
            elif kind == "XD":
                self.del_state[f[1]] = "done"
                self.counts["deletes"] += 1
            elif kind == "XE":
                self.del_state[f[1]] = "failed"
            else:
                self.end = line

    def acceptable(self, s):
        w = self.writes[s]
        d = self.durable[s]
        if d == 0:
            return [self.base[s]] + w
        return w[d - 1:]

    def prefix_durable(self, tags):
        """The prefix property: vpool appends a write to its log before it
        acknowledges it, and a crash leaves a prefix of the log. So if a write
        of this round is seen after the crash (its own record, or a later one
        that carries its sector, survived), every write acknowledged before
        it was sent must be there too. Returns (durable, witness): `durable`
        extended by that rule, and the tag of the latest-sent write seen."""
        witness, at = None, -1
        for t in set(tags):
            line = self.tag_line.get(t)
            if line is not None and line > at:
                witness, at = t, line
        durable = list(self.durable)
        for req, line in zip(self.acked, self.ack_lines):
            if line > at:
                break
            start, idx = self.sent[req]
            for i, k in enumerate(idx):
                if durable[start + i] < k + 1:
                    durable[start + i] = k + 1
        return durable, witness

    def acceptable_with(self, durable, s):
        w = self.writes[s]
        d = durable[s]
        if d == 0:
            return [self.base[s]] + w
        return w[d - 1:]

    def snap_acceptable(self, name, s):
        lo = self.snap_lo[name][s]
        hi = self.snap_hi[name][s] if name in self.snap_hi else len(self.writes[s])
        w = self.writes[s]
        if lo == 0:
            return [self.base[s]] + w[:hi]
        return w[lo - 1:hi]


def check_image(data, sectors, acceptable, what, lost_writes=None, durable=None, writes=None):
    """Decodes every sector; returns (tags, errors, lost) where lost counts
    sectors that hold a value older than their last durable write."""
    tags = []
    errors = []
    lost = 0
    for s in range(sectors):
        o = s * SECTOR
        t = decode_sector(data[o:o + SECTOR], s)
        tags.append(t if t is not None else 0xFFFFFFFFFFFFFFFF)
        if t is None:
            u = struct.unpack_from("<QQ", data, o)
            errors.append("%s sector %d: neither zeros nor one whole write (first unit: tag %#x, sector %d)" % (what, s, u[0], u[1]))
            continue
        ok = acceptable(s)
        if t not in ok:
            detail = ""
            if durable is not None and durable[s] > 0:
                lost += 1
                detail = " LOST-FLUSHED: write %#x (%d of %d writes this round) was durable" % (
                    writes[s][durable[s] - 1], durable[s], len(writes[s]))
            errors.append("%s sector %d: holds tag %#x, acceptable %s%s" % (
                what, s, t, "[" + ", ".join("%#x" % x for x in ok[:6]) + (", ..." if len(ok) > 6 else "") + "]", detail))
    return tags, errors, lost


# ----------------------------------------------------------------- commands


def cmd_wait(a):
    """Until the daemon's API answers (the pool opened), or the timeout."""
    api = Api(a.api, a.token, timeout=10)
    deadline = time.monotonic() + a.timeout
    last = None
    while time.monotonic() < deadline:
        if a.qemu_pid and not os.path.exists("/proc/%d" % a.qemu_pid):
            die("QEMU exited before the API answered (last error: %s)" % last)
        if a.console and os.path.exists(a.console):
            with open(a.console, "rb") as f:
                for line in f.read().decode("utf-8", "replace").splitlines():
                    if "POWERCUT-GUEST: FAIL" in line:
                        die("the guest says: %s" % line.strip())
        try:
            info = api.call("GET", "/v1/pool")
            print(json.dumps(info, sort_keys=True))
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        time.sleep(0.2)
    die("the API did not answer within %d s (last error: %s)" % (a.timeout, last))


def cmd_init(a):
    api = Api(a.api, a.token)
    api.call("POST", "/v1/volumes", {"name": VOLUME, "size_bytes": a.sectors * SECTOR, "ephemeral": False})
    api.call("POST", "/v1/flush")
    State.create(a.state, a.sectors)
    print("created volume %s (%d sectors) and flushed" % (VOLUME, a.sectors))


def cmd_work(a):
    import nbd

    rng = random.Random(a.seed)
    sectors = a.sectors
    tag = a.round << 32
    log = open(a.log, "w")
    lock = threading.Lock()
    lineno = [0]

    def L(s):
        with lock:
            log.write(s + "\n")
            log.flush()
            lineno[0] += 1
            return lineno[0] - 1

    h = nbd_connect(a.nbd, VOLUME)
    api = Api(a.api, a.token, timeout=60)
    existing = api.snapshots()
    L("ready")
    stop = threading.Event()

    def snapshotter():
        # Creates a snapshot every 0.3-2 s; keeps at most 3, deleting the
        # oldest. Ends at the first failure (the power is gone).
        srng = random.Random(a.seed ^ 0x5A5A)
        live = list(existing)
        k = 0
        while not stop.is_set():
            if stop.wait(srng.uniform(0.3, 2.0)):
                break
            k += 1
            name = "r%ds%d" % (a.round, k)
            L("SS " + name)
            try:
                api.call("POST", "/v1/volumes/%s/snapshots" % VOLUME, {"name": name})
            except Exception as e:  # noqa: BLE001 - any failure ends it
                L("SE %s %s" % (name, str(e).replace("\n", " ")))
                return
            L("SD " + name)
            live.append(name)
            while len(live) > 3:
                old = live.pop(0)
                L("XS " + old)
                try:
                    api.call("DELETE", "/v1/volumes/%s/snapshots/%s" % (VOLUME, old))
                except Exception as e:  # noqa: BLE001
                    L("XE %s %s" % (old, str(e).replace("\n", " ")))
                    return
                L("XD " + old)

    snap_thread = None
    if a.snapshots:
        snap_thread = threading.Thread(target=snapshotter, daemon=True)
        snap_thread.start()

    busy = bytearray(sectors)
    inflight = {}  # cookie -> (kind, id, start, n, buffer)
    tag_of = {}
    expect = {}  # sector -> tag of its last acknowledged write
    flushes = 0
    deadline = time.monotonic() + a.max_seconds

    def reap():
        for c in list(inflight):
            kind, i, start, n, buf = inflight[c]
            if h.aio_command_completed(c):  # raises if the command failed
                del inflight[c]
                if kind == "F":
                    L("FD %d" % i)
                    continue
                for s in range(start, start + n):
                    busy[s] = 0
                if kind == "R":
                    got = buf.to_bytearray()
                    for s in range(start, start + n):
                        if s in expect:
                            o = (s - start) * SECTOR
                            if got[o:o + SECTOR] != sector_bytes(expect[s], s):
                                raise AssertionError(
                                    "read of sector %d does not return its last acknowledged write %#x (got tag %#x)"
                                    % (s, expect[s], struct.unpack_from("<Q", got, o)[0]))
                    continue
                L(("AF %d" if kind == "WF" else "A %d") % i)
                for s in range(start, start + n):
                    expect[s] = tag_of[i]
                del tag_of[i]

    try:
        while time.monotonic() < deadline:
            while len(inflight) >= 16:
                h.poll(-1)
                reap()
            r = rng.random()
            if r >= 0.92:
                if rng.random() < 0.5:
                    n = rng.randrange(1, 32)
                    start = rng.randrange(0, HOT - n + 1)
                else:
                    n = rng.choice([8, 64])
                    start = rng.randrange(0, sectors - n + 1, 8)
                if any(busy[start:start + n]):
                    h.poll(0)
                    reap()
                    continue
                for s in range(start, start + n):
                    busy[s] = 1
                buf = nbd.Buffer(n * SECTOR)
                c = h.aio_pread(buf, start * SECTOR)
                inflight[c] = ("R", 0, start, n, buf)
            elif r < 0.06:
                c = h.aio_flush()
                inflight[c] = ("F", flushes, 0, 0, None)
                L("FS %d" % flushes)
                flushes += 1
            else:
                shape = rng.random()
                if shape < 0.45:
                    n = rng.choice([8, 8, 16, 32, 64, 128, 256])
                    start = rng.randrange(0, sectors - n + 1, 8)
                elif shape < 0.65:
                    n = rng.randrange(1, 24)
                    start = rng.randrange(0, sectors - n + 1)
                else:
                    n = rng.randrange(1, 8)
                    start = rng.randrange(0, HOT - n + 1)
                if any(busy[start:start + n]):
                    h.poll(0)
                    reap()
                    continue
                for s in range(start, start + n):
                    busy[s] = 1
                if r < 0.13:
                    no_hole = rng.random() < 0.5
                    i = L("Z %d %d" % (start, n))
                    tag_of[i] = 0
                    c = h.aio_zero(n * SECTOR, start * SECTOR, flags=nbd.CMD_FLAG_NO_HOLE if no_hole else 0)
                    inflight[c] = ("Z", i, start, n, None)
                else:
                    tag += 1
                    data = b"".join(struct.pack("<QQ", tag, s) * 32 for s in range(start, start + n))
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    fua = rng.random() < 0.05
                    i = L("W %d %d %d" % (tag, start, n))
                    tag_of[i] = tag
                    c = h.aio_pwrite(buf, start * SECTOR, flags=nbd.CMD_FLAG_FUA if fua else 0)
                    inflight[c] = ("WF" if fua else "W", i, start, n, buf)
            h.poll(0)
            reap()
        L("timeout")
    except nbd.Error as e:
        L("error %s" % str(e).replace("\n", " "))
    except Exception as e:  # noqa: BLE001
        L("BUG %r" % e)
    stop.set()
    if snap_thread:
        snap_thread.join(timeout=5)


def cmd_check(a):
    st = State(a.state)
    n = st.sectors
    base = State.load_tags(os.path.join(a.state, "base.bin"), n)
    api = Api(a.api, a.token)
    text = open(a.log).read() if a.log else ""
    m = Model(base, text)
    errors = []
    lost = 0
    c = m.counts
    print("round log: %d requests sent, %d acknowledged, %d flushes, %d snapshots created, %d deleted; client ended with: %s"
          % (c["sent"], c["acked"], c["flushes"], c["snapshots"], c["deletes"], m.end), flush=True)
    if m.end.startswith("BUG"):
        errors.append("the work client found a wrong read while running: %s" % m.end)

    try:
        vols = [v["name"] for v in api.call("GET", "/v1/volumes")["volumes"]]
    except Exception as e:  # noqa: BLE001
        die("listing volumes: %s" % e)
    if VOLUME not in vols:
        durable = sum(1 for d in m.durable if d)
        die("volume %s is gone after the power cut (volumes: %s); %d sectors had durable writes this round"
            % (VOLUME, vols, durable), EXIT_LOST)

    data = read_all(a.nbd, VOLUME, n)
    tags, errs, lost_v = check_image(data, n, m.acceptable, "volume", durable=m.durable, writes=m.writes)
    errors += errs
    lost += lost_v
    prefix_extra = 0
    if not errs:
        # The prefix property (see Model.prefix_durable).
        durable2, witness = m.prefix_durable(tags)
        prefix_extra = sum(1 for a, b in zip(durable2, m.durable) if a != b)
        for s in range(n):
            ok = m.acceptable_with(durable2, s)
            if tags[s] not in ok:
                errors.append("volume sector %d: holds tag %#x, but write %#x was acknowledged before write %#x "
                              "was sent, and that one survived NOT-A-PREFIX" % (
                                  s, tags[s], m.writes[s][durable2[s] - 1], witness))

    # Snapshots.
    present = api.snapshots()
    known = st.meta["snapshots"]  # checked before: name -> "known" | "deleted"
    for name in present:
        if name in m.del_state and m.del_state[name] == "done":
            errors.append("snapshot %s is there after its delete returned LOST-FLUSHED" % name)
            lost += 1
    for name, s in m.snap_state.items():
        if s == "done" and name not in present and m.del_state.get(name) not in ("sent", "done", "failed"):
            errors.append("snapshot %s is gone although its create returned LOST-FLUSHED" % name)
            lost += 1
    for name, s in known.items():
        if s == "known" and name not in present and m.del_state.get(name) not in ("sent", "done", "failed"):
            errors.append("snapshot %s (checked in an earlier round) is gone although nobody deleted it" % name)
    checked = 0
    for name in present:
        path = os.path.join(a.state, "snap-%s.bin" % name)
        snap = read_all(a.nbd, "%s@%s" % (VOLUME, name), n)
        if name in known and os.path.exists(path):
            want = State.load_tags(path, n)
            got, errs, _ = check_image(snap, n, lambda s: [want[s]], "snapshot %s" % name)
            errors += errs
        elif name in m.snap_lo:
            got, errs, _ = check_image(snap, n, lambda s, name=name: m.snap_acceptable(name, s), "snapshot %s" % name)
            errors += errs
            State.save_tags(path, got)
            known[name] = "known"
        else:
            errors.append("snapshot %s is there but was never created" % name)
            continue
        checked += 1
    for name in list(known):
        if name not in present:
            known.pop(name)
            try:
                os.unlink(os.path.join(a.state, "snap-%s.bin" % name))
            except FileNotFoundError:
                pass

    try:
        pool = api.call("GET", "/v1/pool")
    except Exception as e:  # noqa: BLE001
        pool = {"error": str(e)}
    if errors:
        print("powercut-client: %d errors, %d of them lost flushed writes or snapshots; the first ones:"
              % (len(errors), lost), file=sys.stderr)
        for e in errors[:20]:
            print("  " + e, file=sys.stderr)
        print("pool after the crash: %s" % json.dumps(pool, sort_keys=True), file=sys.stderr)
        sys.exit(EXIT_LOST if lost else EXIT_FAIL)
    State.save_tags(os.path.join(a.state, "base.bin"), tags)
    st.save()
    durable = sum(1 for d in m.durable if d)
    written = sum(1 for w in m.writes if w)
    print("check OK: %d sectors (%d written last round, %d with a durable write, %d more by the prefix rule), "
          "%d snapshots (%s); pool: %s"
          % (n, written, durable, prefix_extra, checked, " ".join(present), json.dumps(pool, sort_keys=True)))


def cmd_selftest(_a):
    """The oracle against made-up histories: it must accept the possible
    outcomes and reject a lost flushed write, a torn sector, a resurrected
    or lost snapshot."""
    n = 16
    base = [0] * n
    base[5] = 7
    log = "\n".join([
        "ready",        # 0
        "W 11 0 4",     # 1
        "A 1",          # 2
        "FS 0",         # 3
        "W 12 2 4",     # 4: sectors 2..5, sent after FS 0: not covered by it
        "FD 0",         # 5: write 11 durable on 0..3
        "A 4",          # 6
        "W 13 8 1",     # 7
        "AF 7",         # 8: FUA: durable
        "W 14 9 1",     # 9: never acknowledged
        "SS a",         # 10: write 12 acked before: snapshot sees it
        "W 15 3 1",     # 11
        "SD a",         # 12: snapshot a done: write 12 durable
        "A 11",         # 13
        "W 16 12 1",    # 14
        "A 14",         # 15: not durable: no flush after it
        "W 17 13 1",    # 16: never acknowledged
        "error killed",
    ])
    m = Model(base, log)
    assert m.acceptable(0) == [11], m.acceptable(0)
    assert m.acceptable(2) == [12], m.acceptable(2)
    assert m.acceptable(3) == [12, 15], m.acceptable(3)
    assert m.acceptable(5) == [12], m.acceptable(5)
    assert m.acceptable(6) == [0], m.acceptable(6)
    assert m.acceptable(8) == [13], m.acceptable(8)
    assert m.acceptable(9) == [0, 14], m.acceptable(9)
    assert m.snap_acceptable("a", 3) == [12, 15], m.snap_acceptable("a", 3)
    assert m.snap_acceptable("a", 5) == [12], m.snap_acceptable("a", 5)
    assert m.snap_acceptable("a", 9) == [0, 14], m.snap_acceptable("a", 9)

    def image(tags):
        return b"".join(sector_bytes(t, s) for s, t in enumerate(tags))

    good = [11, 11, 12, 15, 12, 12, 0, 0, 13, 14, 0, 0, 0, 0, 0, 0]
    _, errs, lost = check_image(image(good), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert not errs and not lost, errs
    # A lost flushed write: sector 1 back to its base.
    bad = list(good)
    bad[1] = 0
    _, errs, lost = check_image(image(bad), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert lost == 1 and "LOST-FLUSHED" in errs[0], errs
    # A write made durable only by the snapshot's flush, lost.
    bad = list(good)
    bad[5] = 7
    _, errs, lost = check_image(image(bad), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert lost == 1, errs
    # Another sector's data.
    img = bytearray(image(good))
    img[7 * SECTOR:8 * SECTOR] = sector_bytes(13, 8)
    _, errs, _ = check_image(bytes(img), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert len(errs) == 1 and "neither zeros" in errs[0], errs
    # A torn sector: half of write 12, half of write 15.
    img = bytearray(image(good))
    img[3 * SECTOR + 256:4 * SECTOR] = sector_bytes(12, 3)[256:]
    _, errs, _ = check_image(bytes(img), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert len(errs) == 1, errs
    # The prefix rule: if write 17 (sent at line 16) is seen, write 16
    # (acknowledged at line 15, never flushed) must be there too.
    assert m.acceptable(12) == [0, 16], m.acceptable(12)
    d2, witness = m.prefix_durable(good)
    assert witness == 15 and m.acceptable_with(d2, 12) == [0, 16], (witness, d2)
    bad = list(good)
    bad[13] = 17
    _, errs, _ = check_image(image(bad), n, m.acceptable, "v", durable=m.durable, writes=m.writes)
    assert not errs, errs  # per sector, sector 12 may still be 0 ...
    d2, witness = m.prefix_durable(bad)
    assert witness == 17 and m.acceptable_with(d2, 12) == [16], (witness, m.acceptable_with(d2, 12))  # ... but not as a prefix
    bad[12] = 16
    d2, witness = m.prefix_durable(bad)
    assert all(bad[s] in m.acceptable_with(d2, s) for s in range(n))
    # With nothing of this round seen, the rule adds nothing.
    d2, witness = m.prefix_durable([0] * n)
    assert witness is None and d2 == m.durable
    print("oracle self-test OK: accepts the possible outcomes, rejects a lost flushed write, another sector's data, a torn sector, a non-prefix")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait")
    w.add_argument("--api", type=int, required=True)
    w.add_argument("--token", required=True)
    w.add_argument("--timeout", type=float, default=300)
    w.add_argument("--qemu-pid", type=int, default=0)
    w.add_argument("--console", default="", help="the guest's console log: give up on a FAIL line")
    i = sub.add_parser("init")
    i.add_argument("--api", type=int, required=True)
    i.add_argument("--token", required=True)
    i.add_argument("--state", required=True)
    i.add_argument("--sectors", type=int, default=32768)
    k = sub.add_parser("work")
    k.add_argument("--nbd", type=int, required=True)
    k.add_argument("--api", type=int, required=True)
    k.add_argument("--token", required=True)
    k.add_argument("--log", required=True)
    k.add_argument("--seed", type=int, required=True)
    k.add_argument("--round", type=int, required=True)
    k.add_argument("--sectors", type=int, default=32768)
    k.add_argument("--max-seconds", type=float, default=300)
    k.add_argument("--no-snapshots", dest="snapshots", action="store_false")
    c = sub.add_parser("check")
    c.add_argument("--nbd", type=int, required=True)
    c.add_argument("--api", type=int, required=True)
    c.add_argument("--token", required=True)
    c.add_argument("--state", required=True)
    c.add_argument("--log", default="")
    sub.add_parser("selftest")
    a = p.parse_args()
    {"wait": cmd_wait, "init": cmd_init, "work": cmd_work, "check": cmd_check, "selftest": cmd_selftest}[a.cmd](a)


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    main()

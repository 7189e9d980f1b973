"""Read an offline W&B run file (``run-*.wandb``) without the W&B service: a LevelDB-style log of
protobuf ``Record`` messages (7-byte file header, 32 KiB blocks, 7-byte record headers)."""
import glob
import json
import struct

BLOCK = 32768


def read_run(run_dir) -> tuple[list[dict], dict, dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    data = open(path, "rb").read()
    pos, recs, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, n, typ = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if typ == 0 and n == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + n], pos + n
        if typ == 1:
            recs.append(chunk)
        elif typ == 2:
            buf = chunk
        elif typ == 3:
            buf += chunk
        elif typ == 4:
            recs.append(buf + chunk)
    history, summary, config = [], {}, {}
    for d in recs:
        r = pb.Record()
        r.ParseFromString(d)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in r.summary.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    return history, summary, config

"""The connectorx engine's child process (see cx.py): reads a day with connectorx and writes it
to stdout as one Arrow IPC stream.

Run as a script (`python cx_child.py`), not as a module of the package: it imports pyarrow and
connectorx only, so it starts in a fraction of a second. Its one input, a JSON object on stdin
(`url`, `steps`, `batch_rows`, `pre`), keeps the password out of the process's arguments. Each
step is a list of queries connectorx reads at once (one connection and thread each); the steps
are read one after the other, into the one stream. An
error is written to stderr as one last line starting with ERROR_MARK, and the exit code is 1.
"""

import json
import os
import sys

ERROR_MARK = "INGESTD-CX-ERROR "


def main() -> int:
    task = json.loads(sys.stdin.read())
    sys.stdin.close()
    try:
        import connectorx as cx
        import pyarrow as pa
        out = os.fdopen(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
        writer = schema = None
        for queries in task["steps"]:
            reader = cx.read_sql(task["url"], queries if len(queries) > 1 else queries[0], protocol="cursor",
                                 return_type="arrow_stream", batch_size=int(task["batch_rows"]),
                                 pre_execution_query=task["pre"])
            if writer is None:
                schema = reader.schema
                writer = pa.ipc.new_stream(out, schema)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                if batch.num_rows:
                    writer.write_batch(batch if batch.schema.equals(schema) else batch.cast(schema))
            del reader
        if writer is not None:
            writer.close()
        return 0
    except BrokenPipeError:
        return 2  # the daemon stopped reading
    except BaseException as exc:  # noqa: BLE001  (everything goes back to the daemon)
        text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stderr.write(f"\n{ERROR_MARK}{text}\n")
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush = lambda: None  # stdout may be a closed pipe: nothing to flush at exit
    os._exit(code)

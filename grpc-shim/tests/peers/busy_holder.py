"""A hostile peer of the shim (run as another uid): holds N connections and keeps every one
active, a request (an unknown method, answered UNIMPLEMENTED) every half second on each, so no
connection is ever idle for a second. Reconnects whatever is closed. Prints, every half second,
how many of its connections the shim has taken in (sent its SETTINGS)."""
import asyncio
import resource
import sys

SOCKET, N = sys.argv[1], int(sys.argv[2])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def indexed_name(index, value):  # HPACK literal without indexing, static-table name
    return bytes([index, len(value)]) + value


def new_name(name, value):  # HPACK literal without indexing, new name
    return bytes([0, len(name)]) + name + bytes([len(value)]) + value


# :method POST, :scheme http, :path, :authority, content-type, te.
BLOCK = (b"\x83\x86" + indexed_name(4, b"/hostile.Holder/Hold") + indexed_name(1, b"localhost")
         + new_name(b"content-type", b"application/grpc") + new_name(b"te", b"trailers"))
taken_in = 0


async def peer():
    global taken_in
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(SOCKET)
            writer.write(PREFACE + frame(4, 0, 0, b""))
            await writer.drain()
            first = await reader.read(65536)
            if first:
                taken_in += 1
                try:
                    drain = asyncio.ensure_future(drain_reads(reader))
                    stream = 1
                    while not drain.done():
                        writer.write(frame(1, 0x5, stream, BLOCK))  # END_HEADERS | END_STREAM
                        await writer.drain()
                        stream += 2
                        await asyncio.sleep(0.5)
                finally:
                    taken_in -= 1
            writer.close()
        except OSError:
            pass
        await asyncio.sleep(0.5)


async def drain_reads(reader):
    while await reader.read(65536):
        pass


async def main():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    peers = [asyncio.ensure_future(peer()) for _ in range(N)]
    while True:
        print(taken_in, flush=True)
        await asyncio.sleep(0.5)
        if any(p.done() for p in peers):
            for p in peers:
                if p.done() and p.exception():
                    raise p.exception()


asyncio.run(main())

"""The ceiling: a plain single-process Tornado "hello world" (uvloop when present)."""
import asyncio
import sys

import tornado.web

try:
    import uvloop
    uvloop.install()
except ImportError:
    pass


class Hello(tornado.web.RequestHandler):
    def get(self):
        self.write("ok")


async def main(port: int) -> None:
    tornado.web.Application([(r"/", Hello)]).listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

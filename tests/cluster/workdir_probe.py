"""A Ray job that watches its own working directory while its driver joins the cluster.

Exits 1 if the directory vanished meanwhile: a node re-extracting the job's package under the
running driver, which then cannot import what it has not imported yet.
"""

import os
import sys
import threading
import time

import ray

here = os.getcwd()  # the job's copy of the working directory
vanished = []
stop = threading.Event()


def watch() -> None:
    while not stop.is_set():
        if not os.path.isdir(here):
            vanished.append(time.time())
        time.sleep(0.002)


watcher = threading.Thread(target=watch)
watcher.start()
ray.init()  # the job's cluster, as every distdl command run as a job joins it
time.sleep(2)  # the nodes' agents set up the job's environment around the driver's start
stop.set()
watcher.join()
print(f"the working directory vanished {len(vanished)} times while the driver joined")
sys.exit(1 if vanished else 0)

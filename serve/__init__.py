"""kandinsky-serve around the stages in ``deployments/``.

* ``serve.graph`` — the stage registry, the Ray Serve application, the ingress and the per-request plan;
* ``serve.http`` — the FastAPI app: schemas, auth, admission, job routes, the OpenAI and A1111 APIs;
* ``serve.jobs`` — asynchronous jobs: store, progress, runner, store actor;
* ``serve.training`` — the tiny checkpoint writer, the embedded model's recipe, prior fine-tuning;
* ``serve.tools`` — benchmarks, load tests, cluster rendering;
* ``settings.py`` (configuration), ``errors.py``, ``client.py``, ``cli.py``.
"""

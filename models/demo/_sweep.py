# Temporary: hyper-parameter sweep on a GPU machine. Not part of the package.
import json, os, sys, dataclasses, multiprocessing as mp, time, traceback
def job(name, overrides, out):
    try:
        import torch, logging
        logging.basicConfig(level=logging.INFO, filename=f"/tmp/sweeplogs/{name}.log", format="%(asctime)s %(message)s")
        from latentrt.models.demo import train as T, evaluate as E
        cfg = T.TrainConfig(device="cuda", **overrides)
        rec = T.train(f"/tmp/sweep/{name}", cfg)
        pipe = E.load_diffusers(f"/tmp/sweep/{name}").to("cuda")
        prompts = E.eval_prompts(0)
        res = {}
        for steps in (16,):
            for g in (3.0, 5.0, 7.0):
                imgs = E.generate_diffusers(None, [c for c,_,_ in prompts], steps=steps, guidance=g, pipe=pipe)
                r = E.score_generated(prompts, imgs)
                res[f"s{steps}_g{g}"] = {k: {a: round(v,3) for a,v in d.items()} for k,d in r.items()}
        json.dump({"overrides": overrides, "record": rec, "eval": res}, open(f"{out}/{name}.json","w"), indent=1)
    except Exception:
        open(f"/tmp/sweeplogs/{name}.err","w").write(traceback.format_exc())
if __name__ == "__main__":
    out = os.environ["OUT"]; os.makedirs("/tmp/sweeplogs", exist_ok=True)
    configs = json.loads(open(sys.argv[1]).read())
    mp.set_start_method("spawn")
    ps = [mp.Process(target=job, args=(n, o, out)) for n, o in configs.items()]
    [p.start() for p in ps]; [p.join() for p in ps]

#!/usr/bin/env python3
"""Module import graph of a Rust crate's src/: reads `use crate::..`, `crate::x::` and `super::` paths."""
import os, re, sys
root = sys.argv[1]
mods = {}
for dp, dn, fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p = os.path.join(dp, f)
        rel = os.path.relpath(p, root)[:-3]
        if rel.startswith('bin/') or rel in ('main',): continue
        name = rel.replace('/', '::')
        if name.endswith('::mod'): name = name[:-5]
        if name == 'lib': continue
        mods[name] = p
def strip_tests(src):
    i = src.find('#[cfg(test)]')
    return src if i < 0 else src[:i]
names = set(mods)
edges = {m: set() for m in mods}
for m, p in mods.items():
    src = strip_tests(open(p).read())
    src = re.sub(r'//.*', '', src)
    # expand use crate::{a, b::c}
    for mm in re.finditer(r'crate::(\{[^;]*\}|[\w:]+)', src):
        body = mm.group(1)
        cands = re.findall(r'[\w]+(?:::[\w]+)*', body)
        for c in cands:
            parts = c.split('::')
            # longest prefix that is a module
            best = None
            for k in range(len(parts), 0, -1):
                n = '::'.join(parts[:k])
                if n in names: best = n; break
            if best and best != m and not m.startswith(best + '::') :
                edges[m].add(best)
    for mm in re.finditer(r'super::(\w+)', src):
        parent = '::'.join(m.split('::')[:-2])
        n = (parent + '::' if parent else '') + mm.group(1)
        if n in names and n != m: edges[m].add(n)
# SCCs (Tarjan)
idx = {}; low = {}; st = []; on = set(); sccs = []; c = [0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        s = []
        while True:
            w = st.pop(); on.discard(w); s.append(w)
            if w == v: break
        sccs.append(s)
for v in sorted(mods):
    if v not in idx: sc(v)
comp = {v: i for i, s in enumerate(sccs) for v in s}
floor = {}
def fl(i):
    if i in floor: return floor[i]
    floor[i] = 0
    deps = {comp[w] for v in sccs[i] for w in edges[v]} - {i}
    floor[i] = 1 + max((fl(d) for d in deps), default=0)
    return floor[i]
for i in range(len(sccs)): fl(i)
circles = [sorted(s) for s in sccs if len(s) > 1]
print(f"modules: {len(mods)}  floors: {max(floor.values())}  circles: {len(circles)} {circles}")
byf = {}
for i, s in enumerate(sccs):
    byf.setdefault(floor[i], []).extend(s)
for f in sorted(byf):
    print(f"  floor {f}: " + ", ".join(sorted(byf[f])))
if '-v' in sys.argv:
    for m in sorted(edges): print(f"  {m} -> {', '.join(sorted(edges[m]))}")

// mira_kernels._C._EvalPlan: one eval call of a MIRA projection, prepared once and replayed while
// everything it was prepared from is unchanged (mira/layers.py, MiraProjection._plan_eval).
//
// Why: in a network the projection runs right after large GEMMs that have evicted the
// interpreter's caches, and there every Python frame and attribute read of the layer's forward
// costs microseconds: the forward, the query choice and the retrieval cache's key measured ~68 us
// per block at B = 1 on a Zen 4 (benchmarks/budget.py), over a third of the module's cost over
// nn.Linear. A plan does the same work in one C call: it checks that nothing the layer's Python
// would read has changed (guards), then calls the eval fast path (_cpu_eval_linear, csrc/cpu/
// fast_path.cpp) with the arguments the layer computed when it made the plan.
//
// What it checks on every call, and its answer when a check fails:
//  - guards: (dict, key, object): dict[key] is that very object (or the key is absent, for the
//    `absent` marker). The plan holds a reference to each object, so no other object can take its
//    address: identity is exact. Covers the module attributes, parameter and buffer entries, config
//    fields and hook dicts the forward and nn.Module's call read, and the MIRA_BACKEND /
//    MIRA_CHECK_FINITE keys of the environment (absent). Failed: stale (below).
//  - empty: dicts that must be empty (the module's and the global hooks, which nn.Module's call
//    would run; the query module's, when the plan takes the CLS token itself instead of calling
//    the identity query module). Failed: stale.
//  - sources: the tensors derived arguments were computed from (keys, the active mask; banks where
//    they are masked): the data address, version counter, dtype, sizes and strides each had, as
//    the retrieval cache keys them (mira/memory.py). The plan holds aliases of their storage, so a
//    `.data` swap (which bumps no version counter) always moves the address. Failed: stale. With
//    grad mode on and a source requiring grad: None (autograd must record the op).
//  - unset: context variables that must hold None (use_backend, check_finite): else None.
//  - x_dtypes: x's dtype must be one of these (the CLS-token query's dtype rule), else None.
// A stale plan answers None from then on (`stale` becomes True; it lets go of every object it held)
// and the layer makes a new one; None means "take the layer's own path for this call".
// _cpu_eval_linear itself checks the rest (plain CPU tensors, no autocast / modes / graph needed)
// and answers None where it steps aside.
#include <Python.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/fast_path.h"
#include "eval_plan.h"

namespace mira {
namespace {

struct Stamp {
  PyObject* tensor;  // owned
  const void* data;
  int64_t version;
  c10::ScalarType dtype;
  std::vector<int64_t> sizes, strides;
};

// Addresses a call will read, fetched into the caches all at once before the checks (prefetch).
// After a network's GEMMs every one is a cache miss, and read one after another (a dict, then its
// entry; a tensor, then its TensorImpl, then its storage) they cost a memory latency each. Only
// hints: an address may be stale by the time it is prefetched (a `.data` swap moves a tensor's
// storage), which costs nothing but the hint; no check reads through them.
struct Hints {
  std::vector<const void*> addresses;

  void add(const void* p, int lines = 1) {
    for (int i = 0; i < lines; ++i) addresses.push_back(static_cast<const char*>(p) + 64 * i);
  }
  void add_tensor(PyObject* obj) {
    add(obj);
    if (!THPVariable_Check(obj)) return;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined()) return;
    add(t.unsafeGetTensorImpl(), 3);  // sizes, strides, version counter, storage: the impl's first lines
    if (t.has_storage()) add(t.storage().unsafeGetStorageImpl());
    // The version counter's own allocation (a VariableVersion is one intrusive pointer to it), read
    // by every stamp check; its address copied out as a plain pointer, for a hint only.
    static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion is one pointer");
    const void* counter = nullptr;
    std::memcpy(&counter, &t.unsafeGetTensorImpl()->version_counter(), sizeof counter);
    add(counter);
  }
  template <typename V>
  void add_vector(const V& v) {
    if (!v.empty()) add(v.data(), static_cast<int>((v.size() * sizeof(v[0]) + 63) / 64));
  }
  // Tried and measured no gain (2-vCPU Xeon family 6 model 207, B = 1, benchmarks.budget, 3 runs
  // alternated with the unchanged build, 2026-12-06): also fetching the keys' data (92 KB, the
  // kernel's first read) into L2 here. Every line: the retrieval fell 17.8-19.4 -> 11.6-13.3 us but
  // the checks rose 5.4-6.2 -> 10.1-11.9 (the prefetches wait for the core's miss buffers: the keys
  // arrive at one core's rate whichever phase asks); one line in four: checks +1.8 us, retrieval
  // -1 us. Checks + entry + retrieval stayed at ~30 us either way.
  void fetch() const {
    for (const void* a : addresses) __builtin_prefetch(a);
  }
};

struct Entry {
  PyObject* key;       // owned
  PyObject* expected;  // owned; the plan's `absent` marker for "key not present"
};

// The guards on one dict. In a network nothing mutates these dicts between calls, and a dict's
// version tag (PEP 509: CPython bumps it on every change of the dict) says so with one read: the
// entries are looked up only when the tag moved (~3 cache misses each with cold caches, and a
// plan has ~30: 22 us per call at B = 1 on a Zen 4), and the tag is taken again once they hold.
// Python 3.12 deprecates the tag: there every call looks the entries up.
struct Guard {
  PyObject* dict;  // owned
  uint64_t tag;
  std::vector<Entry> entries;
};

#if PY_VERSION_HEX < 0x030C0000
uint64_t tag_of(PyObject* d) { return reinterpret_cast<PyDictObject*>(d)->ma_version_tag; }
constexpr bool kHaveTags = true;
#else
uint64_t tag_of(PyObject*) { return 0; }
constexpr bool kHaveTags = false;
#endif

struct EvalPlan {
  PyObject_HEAD
  vectorcallfunc vectorcall_slot;  // plan_call: the type's calls skip building an args tuple
  PyObject* fn;        // the eval fast path
  PyObject* args;      // tuple: its arguments, x's slot (0) unused, the query's (3) a token index or unused
  PyObject* query_fn;  // None: args[3] is the query; else query_fn(x) makes it
  PyObject* absent;
  std::vector<Guard>* guards;
  std::vector<PyObject*>* empty;      // owned
  std::vector<PyObject*>* unset_vars;  // owned ContextVars
  std::vector<Stamp>* sources;
  PyObject* aliases;  // tuple keeping the sources' storage alive
  std::vector<c10::ScalarType>* x_dtypes;
  bool stale;
  Hints* hints;
  PyObject* weakrefs;  // weak references to the plan (tests check that it dies with its layer)
  // fn's arguments parsed once, where fn is the CPU fast path (its tensors held by the objects the
  // guards watch); empty: fn is called with them. Shared with a running call (see plan_call).
  std::shared_ptr<mira_cpu::PreparedEval>* prepared;
};

PyObject* as_new_ref(PyObject* o) {
  Py_INCREF(o);
  return o;
}

bool stamp_of(PyObject* obj, Stamp& s) {
  if (!THPVariable_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "_EvalPlan: a source is not a tensor");
    return false;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != c10::kStrided || !mira_cpu::tracks_version(t)) {
    PyErr_SetString(PyExc_ValueError, "_EvalPlan: sources must be strided CPU tensors with a version counter");
    return false;
  }
  s.tensor = as_new_ref(obj);
  s.data = t.const_data_ptr();
  s.version = static_cast<int64_t>(t._version());
  s.dtype = t.scalar_type();
  s.sizes.assign(t.sizes().begin(), t.sizes().end());
  s.strides.assign(t.strides().begin(), t.strides().end());
  return true;
}

// 0: unchanged; 1: changed (stale); 2: a graph is needed now.
int check_stamp(const Stamp& s, bool grad) {
  if (!THPVariable_CheckExact(s.tensor)) return 1;
  const at::Tensor& t = THPVariable_Unpack(s.tensor);
  if (!t.defined() || !mira_cpu::tracks_version(t) || t.const_data_ptr() != s.data ||
      static_cast<int64_t>(t._version()) != s.version ||
      t.scalar_type() != s.dtype || t.sizes() != c10::IntArrayRef(s.sizes) || t.strides() != c10::IntArrayRef(s.strides))
    return 1;
  return grad && t.requires_grad() ? 2 : 0;
}

void plan_clear_vectors(EvalPlan* p) {
  if (p->guards) {
    for (Guard& g : *p->guards) {
      Py_CLEAR(g.dict);
      for (Entry& e : g.entries) {
        Py_CLEAR(e.key);
        Py_CLEAR(e.expected);
      }
    }
  }
  for (auto* v : {p->empty, p->unset_vars})
    if (v)
      for (PyObject*& o : *v) Py_CLEAR(o);
  if (p->sources)
    for (Stamp& s : *p->sources) Py_CLEAR(s.tensor);
}

int plan_traverse(PyObject* self, visitproc visit, void* arg) {
  auto* p = reinterpret_cast<EvalPlan*>(self);
  Py_VISIT(p->fn);
  Py_VISIT(p->args);
  Py_VISIT(p->query_fn);
  Py_VISIT(p->absent);
  Py_VISIT(p->aliases);
  if (p->guards)
    for (const Guard& g : *p->guards) {
      Py_VISIT(g.dict);
      for (const Entry& e : g.entries) {
        Py_VISIT(e.key);
        Py_VISIT(e.expected);
      }
    }
  for (auto* v : {p->empty, p->unset_vars})
    if (v)
      for (PyObject* o : *v) Py_VISIT(o);
  if (p->sources)
    for (const Stamp& s : *p->sources) Py_VISIT(s.tensor);
  return 0;
}

int plan_clear(PyObject* self) {
  auto* p = reinterpret_cast<EvalPlan*>(self);
  Py_CLEAR(p->fn);
  Py_CLEAR(p->args);
  Py_CLEAR(p->query_fn);
  Py_CLEAR(p->absent);
  Py_CLEAR(p->aliases);
  plan_clear_vectors(p);
  if (p->prepared) p->prepared->reset();
  p->stale = true;  // a cleared plan must never run
  return 0;
}

// A stale plan never runs again: it lets go of everything at once (the old storage its aliases
// keep alive, the derived tensors), so that a plan the layer has not replaced yet holds no memory.
PyObject* go_stale(EvalPlan* p) {
  plan_clear(reinterpret_cast<PyObject*>(p));
  Py_RETURN_NONE;
}

void plan_dealloc(PyObject* self) {
  auto* p = reinterpret_cast<EvalPlan*>(self);
  PyObject_GC_UnTrack(self);
  if (p->weakrefs != nullptr) PyObject_ClearWeakRefs(self);
  plan_clear(self);
  delete p->guards;
  delete p->empty;
  delete p->unset_vars;
  delete p->sources;
  delete p->x_dtypes;
  delete p->hints;
  delete p->prepared;
  Py_TYPE(self)->tp_free(self);
}

bool objects_of(PyObject* seq, const char* what, std::vector<PyObject*>& out) {
  if (!PyTuple_Check(seq)) {
    PyErr_Format(PyExc_TypeError, "_EvalPlan: %s must be a tuple", what);
    return false;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(seq); ++i) out.push_back(as_new_ref(PyTuple_GET_ITEM(seq, i)));
  return true;
}

// _EvalPlan(fn, args, query_fn, guards, empty, unset_vars, sources, x_dtypes, absent)
int plan_init(PyObject* self, PyObject* a, PyObject* kw) {
  auto* p = reinterpret_cast<EvalPlan*>(self);
  PyObject *fn, *args, *query_fn, *guards, *empty, *unset_vars, *sources, *x_dtypes, *absent;
  if (kw != nullptr && PyDict_GET_SIZE(kw) != 0) {
    PyErr_SetString(PyExc_TypeError, "_EvalPlan takes positional arguments only");
    return -1;
  }
  if (!PyArg_UnpackTuple(a, "_EvalPlan", 9, 9, &fn, &args, &query_fn, &guards, &empty, &unset_vars, &sources,
                         &x_dtypes, &absent))
    return -1;
  if (p->guards != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "_EvalPlan is initialised once");
    return -1;
  }
  if (!PyCallable_Check(fn) || !PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 11 ||
      (query_fn != Py_None && !PyCallable_Check(query_fn)) ||
      !PyTuple_Check(guards) || !PyTuple_Check(sources) || !PyTuple_Check(x_dtypes)) {
    PyErr_SetString(PyExc_TypeError, "_EvalPlan: bad arguments (see csrc/eval_plan.cpp)");
    return -1;
  }
  p->guards = new std::vector<Guard>();
  p->empty = new std::vector<PyObject*>();
  p->unset_vars = new std::vector<PyObject*>();
  p->sources = new std::vector<Stamp>();
  p->x_dtypes = new std::vector<c10::ScalarType>();
  p->stale = true;  // until initialised completely
  p->fn = as_new_ref(fn);
  p->args = as_new_ref(args);
  p->query_fn = as_new_ref(query_fn);
  p->absent = as_new_ref(absent);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(guards); ++i) {
    PyObject* g = PyTuple_GET_ITEM(guards, i);
    if (!PyTuple_Check(g) || PyTuple_GET_SIZE(g) != 3 || !PyDict_Check(PyTuple_GET_ITEM(g, 0))) {
      PyErr_SetString(PyExc_TypeError, "_EvalPlan: a guard is a (dict, key, object) tuple");
      return -1;
    }
    PyObject* d = PyTuple_GET_ITEM(g, 0);
    Guard* guard = nullptr;
    for (Guard& known : *p->guards)
      if (known.dict == d) guard = &known;
    if (guard == nullptr) {
      // Tag 0 is never a dict's (the counter starts above it): the first call looks every entry up.
      p->guards->push_back({as_new_ref(d), 0, {}});
      guard = &p->guards->back();
    }
    guard->entries.push_back({as_new_ref(PyTuple_GET_ITEM(g, 1)), as_new_ref(PyTuple_GET_ITEM(g, 2))});
  }
  if (!objects_of(empty, "empty", *p->empty) || !objects_of(unset_vars, "unset_vars", *p->unset_vars)) return -1;
  for (PyObject* d : *p->empty)
    if (!PyDict_Check(d)) {
      PyErr_SetString(PyExc_TypeError, "_EvalPlan: `empty` holds dicts");
      return -1;
    }
  for (PyObject* v : *p->unset_vars)
    if (!PyContextVar_CheckExact(v)) {
      PyErr_SetString(PyExc_TypeError, "_EvalPlan: `unset_vars` holds ContextVars");
      return -1;
    }
  PyObject* alias_list = PyList_New(0);
  if (alias_list == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sources); ++i) {
    Stamp s{};
    if (!stamp_of(PyTuple_GET_ITEM(sources, i), s)) {
      Py_DECREF(alias_list);
      return -1;
    }
    p->sources->push_back(std::move(s));
    // An alias of the storage (a detached view): no later tensor can be allocated at its address.
    PyObject* alias = THPVariable_Wrap(THPVariable_Unpack(PyTuple_GET_ITEM(sources, i)).detach());
    if (alias == nullptr || PyList_Append(alias_list, alias) != 0) {
      Py_XDECREF(alias);
      Py_DECREF(alias_list);
      return -1;
    }
    Py_DECREF(alias);
  }
  p->aliases = PyList_AsTuple(alias_list);
  Py_DECREF(alias_list);
  if (p->aliases == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(x_dtypes); ++i) {
    PyObject* d = PyTuple_GET_ITEM(x_dtypes, i);
    if (!THPDtype_Check(d)) {
      PyErr_SetString(PyExc_TypeError, "_EvalPlan: x_dtypes holds torch.dtype objects");
      return -1;
    }
    p->x_dtypes->push_back(reinterpret_cast<THPDtype*>(d)->scalar_type);
  }
  p->hints = new Hints();
  for (const Guard& g : *p->guards) p->hints->add(g.dict);
  for (PyObject* d : *p->empty) p->hints->add(d);
  for (PyObject* v : *p->unset_vars) p->hints->add(v);
  for (const Stamp& st : *p->sources) {
    p->hints->add_tensor(st.tensor);
    p->hints->add_vector(st.sizes);
    p->hints->add_vector(st.strides);
  }
  // The plan's own arrays, allocated apart from it, and the sources' version counters: without them
  // the checks took 10.3 us cold (guards 1.9, stamps 4.2), with them 8.1-9.2 (guards 0.5-1.1, stamps
  // 3.3) (Zen 4, B = 1, benchmarks.budget's cold caches, timestamps in ready()).
  p->hints->add_vector(*p->guards);
  p->hints->add_vector(*p->sources);
  p->hints->add_vector(*p->empty);
  p->hints->add_vector(*p->unset_vars);
  p->hints->add_vector(*p->x_dtypes);
  p->hints->add(p->args);
  for (Py_ssize_t i = 1; i < PyTuple_GET_SIZE(p->args); ++i) {  // the fast path's arguments (not x)
    PyObject* arg = PyTuple_GET_ITEM(p->args, i);
    if (THPVariable_Check(arg)) p->hints->add_tensor(arg);
  }
  p->prepared = new std::shared_ptr<mira_cpu::PreparedEval>();
  if (mira_cpu::is_eval_linear(fn)) {
    p->prepared->reset(mira_cpu::prepare_eval(reinterpret_cast<PyTupleObject*>(p->args)->ob_item, query_fn == Py_None),
                       mira_cpu::free_prepared_eval);
    if (*p->prepared) {
      p->hints->add(p->prepared->get(), 3);
      p->hints->add_vector((*p->prepared)->args.offsets);
    }
  }
  p->stale = false;
  return 0;
}

// Whether every guard holds (false: the plan is stale); -1 with an exception set on a lookup error.
int guards_hold(EvalPlan* p) {
  for (Guard& g : *p->guards) {
    const uint64_t tag = tag_of(g.dict);  // taken first: a lookup that changed the dict shows next time
    if (kHaveTags && g.tag == tag) continue;
    for (const Entry& e : g.entries) {
      PyObject* v = PyDict_GetItemWithError(g.dict, e.key);  // borrowed
      if (v == nullptr) {
        if (PyErr_Occurred()) return -1;
        v = p->absent;
      }
      if (v != e.expected) return 0;
    }
    g.tag = tag;
  }
  for (PyObject* d : *p->empty)
    if (PyDict_GET_SIZE(d) != 0) return 0;
  return 1;
}

// Every check of a call with this x: 1 ready to run, 0 not this time (None), -1 with an exception set.
// A failed guard or stamp makes the plan stale (and it answers 0 from then on).
int ready(EvalPlan* p, PyObject* x) {
  if (p->stale) return 0;
  p->hints->fetch();
  const int held = guards_hold(p);
  if (held <= 0) {
    if (held == 0) go_stale(p);
    return held;
  }
  bool needs_graph = false;
  const bool grad = at::GradMode::is_enabled();
  for (const Stamp& s : *p->sources) {
    const int r = check_stamp(s, grad);
    if (r == 1) {
      go_stale(p);
      return 0;
    }
    needs_graph |= r == 2;
  }
  if (needs_graph) return 0;
  for (PyObject* v : *p->unset_vars) {
    PyObject* value = nullptr;
    if (PyContextVar_Get(v, Py_None, &value) != 0) return -1;
    const bool unset = value == Py_None;
    Py_DECREF(value);
    if (!unset) return 0;
  }
  if (!p->x_dtypes->empty()) {
    if (!THPVariable_Check(x)) return 0;
    const c10::ScalarType dt = THPVariable_Unpack(x).scalar_type();
    bool ok = false;
    for (c10::ScalarType d : *p->x_dtypes) ok |= d == dt;
    if (!ok) return 0;
  }
  return 1;
}

bool one_argument(Py_ssize_t nargs, PyObject* kwnames) {
  if (nargs == 1 && (kwnames == nullptr || PyTuple_GET_SIZE(kwnames) == 0)) return true;
  PyErr_SetString(PyExc_TypeError, "an _EvalPlan takes x alone");
  return false;
}

PyObject* plan_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* p = reinterpret_cast<EvalPlan*>(self);
  if (!one_argument(PyVectorcall_NARGS(nargsf), kwnames)) return nullptr;
  PyObject* x = args[0];
  const int r = ready(p, x);
  if (r <= 0) {
    if (r < 0) return nullptr;
    Py_RETURN_NONE;
  }
  // Owned for the call: the query module's Python code, or another thread while the kernel runs
  // without the GIL, may make the plan stale, which lets go of these.
  PyObject* held = p->args;
  PyObject* fn = p->fn;
  PyObject* query_fn = p->query_fn;
  Py_INCREF(held);
  Py_INCREF(fn);
  Py_INCREF(query_fn);
  const std::shared_ptr<mira_cpu::PreparedEval> prepared = *p->prepared;
  PyObject* query = nullptr;
  PyObject* y = nullptr;
  if (query_fn != Py_None) query = PyObject_CallOneArg(query_fn, x);
  if (query_fn == Py_None || query != nullptr) {
    if (prepared) {
      y = mira_cpu::eval_prepared(*prepared, x, query);
    } else {
      PyObject* argv[11];
      for (Py_ssize_t i = 0; i < 11; ++i) argv[i] = PyTuple_GET_ITEM(held, i);
      argv[0] = x;
      if (query != nullptr) argv[3] = query;
      y = PyObject_Vectorcall(fn, argv, 11, nullptr);
    }
  }
  Py_XDECREF(query);
  Py_DECREF(query_fn);
  Py_DECREF(fn);
  Py_DECREF(held);
  return y;
}

// plan.check(x): whether a call with x would run now (the checks alone; benchmarks/budget.py times them).
PyObject* plan_check(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!one_argument(nargs, nullptr)) return nullptr;
  const int r = ready(reinterpret_cast<EvalPlan*>(self), args[0]);
  if (r < 0) return nullptr;
  return PyBool_FromLong(r);
}

PyMethodDef kPlanMethods[] = {
    {"check", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(plan_check)), METH_FASTCALL,
     "check(x) -> bool: whether a call with x would run now (a failed guard makes the plan stale)."},
    {nullptr, nullptr, 0, nullptr},
};

// tp_call, for callers that do not use vectorcall.
PyObject* plan_tp_call(PyObject* self, PyObject* args, PyObject* kwargs) { return PyVectorcall_Call(self, args, kwargs); }

PyObject* plan_get_stale(PyObject* self, void*) { return PyBool_FromLong(reinterpret_cast<EvalPlan*>(self)->stale); }

PyGetSetDef kGetSet[] = {
    {"stale", plan_get_stale, nullptr, "True once something the plan was made from has changed.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyObject* plan_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  auto* p = reinterpret_cast<EvalPlan*>(self);
  p->stale = true;
  p->vectorcall_slot = plan_call;
  return self;
}

PyTypeObject kEvalPlanType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "mira_kernels._C._EvalPlan";
  t.tp_basicsize = sizeof(EvalPlan);
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL;
  t.tp_doc = "One eval call of a MIRA projection, replayed while what it was made from is unchanged "
             "(csrc/eval_plan.cpp).";
  t.tp_new = plan_new;
  t.tp_init = plan_init;
  t.tp_dealloc = plan_dealloc;
  t.tp_traverse = plan_traverse;
  t.tp_clear = plan_clear;
  t.tp_call = plan_tp_call;
  t.tp_vectorcall_offset = offsetof(EvalPlan, vectorcall_slot);
  t.tp_getset = kGetSet;
  t.tp_methods = kPlanMethods;
  t.tp_weaklistoffset = offsetof(EvalPlan, weakrefs);
  return t;
}();

}  // namespace

int add_eval_plan_type(PyObject* module) {
  if (PyType_Ready(&kEvalPlanType) < 0) return -1;
  Py_INCREF(&kEvalPlanType);
  if (PyModule_AddObject(module, "_EvalPlan", reinterpret_cast<PyObject*>(&kEvalPlanType)) < 0) {
    Py_DECREF(&kEvalPlanType);
    return -1;
  }
  return 0;
}

}  // namespace mira

// immutorch's native every-op check: a boxed dispatcher fallback on one functionality key that
// the guard includes in the thread's TLS, like a dispatch mode but without a Python call per op.
//
// The fallback decides in C++ whether an op may write into protected memory. Per-schema facts
// (which arguments it writes, whether its outputs are fresh) are asked once from
// immutorch._schema, the one source of those facts; the protected storages are held here,
// pinned, while their frames are active. Only when a written storage is (or may be) protected
// is Python called, with the GIL, to run the same judgement the Python mode runs. Births for
// the block rule ("memory made inside the block is the block's own") are recorded here and
// read from Python through born(). In clone mode, a view made of an alias is handed to Python
// to join the alias's copy-on-write group (`x.data`, which makes one without any op, is seen
// by a property immutorch._clone installs while native serves a clone frame).
#include <torch/extension.h>

#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/ThreadLocalPythonObjects.h>
#include <ATen/functorch/BatchedTensorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/SafePyObject.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/PyInterpreter.h>
#include <torch/csrc/Storage.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace py = pybind11;
using c10::StorageImpl;

namespace {

// ThreadLocalPythonObjects is carried by at::ThreadLocalState into autograd engine threads and
// jit._fork tasks, where the thread_local pointer below is empty.
const char* kStateKey = "immutorch.native.state";

// ThreadLocalPythonObjects::erase is newer than torch 2.4 (its 2.4.1 header has set, get and
// contains only). Where it is missing, leaving puts None under the key instead: current_state()
// takes None for no state, here and in the threads that inherit this thread's objects.
template <typename T, typename = void>
struct HasErase : std::false_type {};
template <typename T>
struct HasErase<T, std::void_t<decltype(T::erase(std::declval<const std::string&>()))>>
    : std::true_type {};

template <typename T = at::impl::ThreadLocalPythonObjects>
void clear_thread_state() {
  if constexpr (HasErase<T>::value) {
    T::erase(kStateKey);
  } else if (T::contains(kStateKey)) {
    Py_INCREF(Py_None);  // the SafePyObject owns one reference (called with the GIL)
    T::set(kStateKey, std::make_shared<c10::SafePyObject>(Py_None, getPyInterpreter()));
  }
}

struct Facts {
  bool ready = false;
  // g_op_generation when these facts were read: an operator registered again at a freed
  // address (a custom op defined anew) must not inherit another's facts, and a schema can be
  // freed only when an operator is deregistered.
  uint64_t generation = 0;
  struct Write {
    int position;
    int when;  // a flag argument that must be true for the write to happen, or -1
    bool meta;
  };
  std::vector<Write> writes;
  bool fresh = false;
  bool lift = false;  // aten::lift_fresh (see record_outputs)
  int view_of = -1;  // the argument whose memory the outputs view, or -1
  bool keep_key = false;  // a CompositeImplicitAutograd kernel: see its decomposition
  // Only that kernel: the op always decomposes below this key, and its writes are judged on
  // the ops it decomposes into, as the Python mode (below autograd) sees them. dropout_ with
  // training=False declares a write it never makes.
  bool composite_only = false;
};

void count_block(bool on);

// What one thread's guards protect, mirrored from its Python ThreadState by sync().
struct State {
  std::unordered_map<const StorageImpl*, c10::intrusive_ptr<StorageImpl>> protected_;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  // The protected tensor objects themselves (and the tensors holding a torch.func wrapper's
  // memory): what a write of size or strides is judged by (ThreadState.object_hits). Not
  // pinned: an address reused by another tensor only sends its size writes to Python, which
  // judges by the Python object. (Pinning would let the State's last owner, which may be a
  // thread without the GIL, free a tensor whose Python object it owns.)
  std::unordered_set<const c10::TensorImpl*> objects;
  int64_t block_start = 0;  // the latest start epoch of an active block frame, 0 for none
  bool by_allocation = false;  // the block's births are dated by allocation (DatingAllocator)
  int64_t epoch = 0;
  bool clone = false;  // a clone-mode frame is active: views of aliases join their groups
  // Views of possibly protected memory waiting to join their source's group. Not joined at
  // once: the view's Python object must not be made here, since the code that asked for the
  // view may make it itself, of its own type (nn.Parameter(x) detaches x in C++, then wraps
  // the result as a Parameter). Joined where membership is asked (join_pending): before a
  // write the fallback judges, at a frame change, where Python asks a tensor's group
  // (_clone.group_of), and at a member's .data; most die first (x[i] read and dropped), and
  // cost no Python call. With fewer than three keys, at the thread's next op, as before.
  std::vector<std::pair<at::Tensor, c10::weak_intrusive_ptr<c10::TensorImpl>>> pending;
  size_t pending_prune_at = 64;  // past this many, the views already gone are dropped
  // Clone mode's aliases made here (alias_for) whose copy-on-write group Python has not made
  // yet, each with its CloneStats (a strong reference): adopted into their groups
  // (g_adopt_cb) before the views waiting, wherever those are joined. A group is needed only
  // where a write into it, or a question about it, comes; a callee that only reads, and
  // drops the alias, costs no Python for it.
  std::vector<std::pair<c10::weak_intrusive_ptr<c10::TensorImpl>, PyObject*>> unadopted;
  size_t unadopted_prune_at = 64;  // past this many, the aliases already gone are dropped
  PyObject* py_state = nullptr;  // the Python ThreadState (a strong reference)
  ~State() {
    if (block_start != 0) {
      count_block(false);
    }
    if ((py_state != nullptr || !unadopted.empty()) && Py_IsInitialized()) {
      py::gil_scoped_acquire gil;
      for (auto& entry : unadopted) Py_DECREF(entry.second);
      Py_XDECREF(py_state);
    }
  }
};

// The keys the fallback is registered on. On each, the aten overloads that the frames it
// serves need not see fall through, at no cost (a boxed fallback costs ~0.3 us an op however
// little it does): what a frame needs is the writes (every frame), the fresh outputs (a block's
// births) and the views (clone mode: a view of an alias joins its group). With three candidate
// keys free: kBirths and kWrites in the thread's TLS (a block, or not), and kViews on no thread:
// it goes into the key set of each member of a copy-on-write group (mark_member), and views
// inherit a tensor's keys, so only ops on members reach it (every view op of every tensor
// reached a TLS key, ~0.3 us each, for the rare view of an alias). With two: kEvery (nothing
// falls through) and kWrites, clone served on kEvery. With one: kEvery.
// Operators registered after install (custom ops, other namespaces) have no fallthrough and
// reach the fallback: nothing is let through that was not known to need no look.
enum Sees { kEvery, kBirths, kWrites, kViews };
struct Key {
  c10::DispatchKey key = c10::DispatchKey::Undefined;
  Sees sees = kEvery;
  std::unique_ptr<torch::Library> fallback;  // on every namespace
  std::unique_ptr<torch::Library> aten;  // the fallthroughs
};
Key g_served[3];
size_t g_nkeys = 0;
c10::DispatchKeySet g_keys;  // all of them: what Python callbacks and facts run with excluded
PyObject* g_facts_cb = nullptr;  // (name, overload) -> facts tuple or None
PyObject* g_write_cb = nullptr;  // (state, name, overload, args) -> None; raises to refuse
PyObject* g_leaves_cb = nullptr;  // (tensor) -> the storages that hold its memory
PyObject* g_join_cb = nullptr;  // (source, out) -> None: out joins source's copy-on-write group

// One thread_local for both: this library is loaded with dlopen, so each thread_local access
// is a call to __tls_get_addr, and the fallback reads both at every op.
struct ThreadLocals {
  std::shared_ptr<State> owned;
  std::unordered_map<const c10::FunctionSchema*, Facts> facts;
};
thread_local ThreadLocals t_local;

// Bumped whenever an operator is deregistered (a listener on the dispatcher, see install):
// only then can a FunctionSchema be freed and another made at its address.
std::atomic<uint64_t> g_op_generation{1};

struct DeregistrationListener : c10::OpRegistrationListener {
  void onOperatorRegistered(const c10::OperatorHandle&) override {}
  void onOperatorDeregistered(const c10::OperatorHandle&) override {
    g_op_generation.fetch_add(1, std::memory_order_relaxed);
  }
};

// Births: process wide, like the Python attribute they stand for, keyed by StorageImpl
// address with no reference held (a weak reference per fresh output cost ~2 us an op). A stale
// entry is harmless: an address is reused only by a storage made after the one recorded, so
// after the block that recorded it started. Only resizable storages are recorded, and a
// record is believed for a resizable storage, or for one that still shows the bytes it was
// born with: a storage over borrowed bytes (torch.from_numpy of memory from before the block)
// at a reused address shows other bytes, so it never passes for the block's own, while the
// block's own tensor stays its own after x.numpy() (which makes its storage non-resizable).
// A record matters only while a block active at its birth is, so the table is emptied
// whenever no block is active on any thread.
struct Birth {
  int64_t epoch;
  const void* data;  // the bytes at birth
};
std::mutex g_births_mutex;
std::unordered_map<const StorageImpl*, Birth> g_births;
int64_t g_active_blocks = 0;  // threads with an active block frame (under g_births_mutex)
// The same count, read without the lock by the allocators below at every allocation.
std::atomic<int64_t> g_blocks_now{0};
// The latest epoch any thread's sync has seen: what a new allocation is stamped with. Read
// before the memory is allocated, so a stamp is never later than the bytes it dates.
std::atomic<int64_t> g_epoch_now{0};

// Births by allocation (DatingAllocator): the address of each CPU allocation made while a
// block is active anywhere, with the epoch it was made at. Believed only for a storage whose
// allocator is the DatingAllocator and whose bytes start at that address: a storage showing
// other memory at a reused address (a file mapped shared, which may show a tensor's pages from
// before the block) has another allocator. A stale entry is harmless, as for g_births: the
// address's next allocation through the DatingAllocator stamps it anew (or finds the table
// emptied, no block active), and memory at a freed address is newer than its stamp.
//
// An open-addressing table that keeps its slots from one block to the next and is emptied by
// starting a new generation: a node-based map allocated and freed a node for every stamp
// (malloc's work, ~250 instructions a stamp, in among the tensors' own allocations).
class AddressStamps {
 public:
  // The epoch stamped at `key`; 0: none.
  int64_t get(const void* key) const {
    if (slots_.empty()) return 0;
    for (size_t i = home(key);; i = (i + 1) & mask()) {
      const Slot& slot = slots_[i];
      if (slot.gen != gen_) return 0;
      if (slot.key == key) return slot.epoch;
    }
  }

  // Stamp `key` with `epoch`; 0 unstamps it (its slot stays, for the probes that pass it).
  void set(const void* key, int64_t epoch) {
    if ((used_ + 1) * 2 > slots_.size()) grow();
    for (size_t i = home(key);; i = (i + 1) & mask()) {
      Slot& slot = slots_[i];
      if (slot.gen != gen_) {
        if (epoch == 0) return;  // nothing to unstamp
        slot = Slot{key, epoch, gen_};
        ++used_;
        return;
      }
      if (slot.key == key) {
        slot.epoch = epoch;
        return;
      }
    }
  }

  // Every stamp gone: O(1), unless the table has grown past what a block needs to keep.
  void clear() {
    used_ = 0;
    if (slots_.size() > kKeepAtMost || ++gen_ == 0) {
      slots_.clear();
      slots_.shrink_to_fit();
      gen_ = 1;
    }
  }

 private:
  struct Slot {
    const void* key;
    int64_t epoch;
    uint32_t gen;  // stamped in generation `gen`: a slot of an older one is empty
  };
  static constexpr size_t kFirst = 1024;
  static constexpr size_t kKeepAtMost = size_t{1} << 16;

  size_t mask() const { return slots_.size() - 1; }
  size_t home(const void* key) const {
    // Fibonacci hashing of the address (allocations are 16-byte aligned: the low bits are 0).
    const uint64_t h = (reinterpret_cast<uintptr_t>(key) >> 4) * 0x9E3779B97F4A7C15ull;
    return static_cast<size_t>(h >> 32) & mask();
  }
  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(old.empty() ? kFirst : old.size() * 2, Slot{nullptr, 0, 0});
    const uint32_t old_gen = gen_;
    gen_ = 1;
    used_ = 0;
    for (const Slot& slot : old) {
      if (slot.gen == old_gen && slot.epoch != 0) set(slot.key, slot.epoch);
    }
  }

  std::vector<Slot> slots_;  // a power of two, or none
  uint32_t gen_ = 1;
  size_t used_ = 0;  // slots of this generation
};
AddressStamps g_allocated;  // under g_births_mutex

// The tensors that are members of a clone-mode copy-on-write group (an alias and the views
// that joined it), marked by immutorch._clone as each joins: a view joins its source's group
// only if the source is one, and a view of memory that may be protected but is no member's
// (a parameter's `weight.t()` inside F.linear, in a block) cost a Python call that found no
// group. Weak: an entry keeps its TensorImpl's address from being reused, never the tensor;
// all threads' groups in one table, since a member can outlive the frame that made it.
std::mutex g_members_mutex;
std::unordered_map<const c10::TensorImpl*, c10::weak_intrusive_ptr<c10::TensorImpl>> g_members;
size_t g_members_prune_at = 64;

// A TensorImpl's own key set, which TensorImpl keeps protected and sets only for keys of its
// own (conj, neg, Python): reached through a class derived from it, never instantiated.
struct KeySetOf : c10::TensorImpl {
  static c10::DispatchKeySet& of(c10::TensorImpl* impl) { return impl->*(&KeySetOf::key_set_); }
};

bool is_member(const at::Tensor& t) {
  std::lock_guard<std::mutex> lock(g_members_mutex);
  auto it = g_members.find(t.unsafeGetTensorImpl());
  return it != g_members.end() && !it->second.expired();
}

std::mutex g_readonly_mutex;
std::unordered_map<const StorageImpl*, c10::weak_intrusive_ptr<StorageImpl>> g_readonly;
std::atomic<size_t> g_readonly_count{0};

int64_t allocation_born_locked(const StorageImpl* s);

// The epoch a storage's memory was born at, as far as there is evidence (0: none, older than
// any block). Every source gives a lower bound, so the latest of them holds.
int64_t born_of(const StorageImpl* s) {
  std::lock_guard<std::mutex> lock(g_births_mutex);
  const int64_t born = allocation_born_locked(s);
  auto it = g_births.find(s);
  if (it == g_births.end()) {
    return born;
  }
  if (s->resizable()) {
    return std::max(born, it->second.epoch);
  }
  const void* data = s->data_ptr().get();
  return data != nullptr && data == it->second.data ? std::max(born, it->second.epoch) : born;
}

void record_birth(const StorageImpl* s, int64_t epoch) {
  if (!s->resizable()) {
    return;
  }
  const void* data = s->data_ptr().get();
  std::lock_guard<std::mutex> lock(g_births_mutex);
  auto [it, inserted] = g_births.try_emplace(s, Birth{epoch, data});
  if (!inserted) {
    // The same storage seen fresh again, or a new one at a freed address: the latest holds.
    it->second.data = data;
    if (it->second.epoch < epoch) {
      it->second.epoch = epoch;
    }
  }
}

// A thread's blocks started (on) or all ended (off).
void count_block(bool on) {
  std::lock_guard<std::mutex> lock(g_births_mutex);
  g_active_blocks += on ? 1 : -1;
  g_blocks_now.store(g_active_blocks, std::memory_order_relaxed);
  if (g_active_blocks == 0) {
    g_births.clear();
    g_allocated.clear();
  }
}

// -- births by allocation ---------------------------------------------------------------------
// A block must tell the memory it made from memory that existed before it. The births key
// (kBirths) dates each fresh output of each op as it returns, which costs a boxed call on every
// op of the block (~0.45 us). The memory can say it instead: every CPU tensor's bytes come from
// the allocator c10::GetAllocator(kCPU) returns, which DatingAllocator wraps, and every meta
// tensor's "bytes" from GetAllocator(kMeta)'s, which MetaDatingAllocator wraps. Each stamps
// what it allocates while a block is active with the epoch, so a block needs only the writes
// key, like a guard that names its tensors. Any other device's allocator that GetAllocator
// knows is wrapped by ForeignAllocator, which notes the first memory made through it: from then
// on blocks date births by op again (and all such memory is no older than that first one).
// Memory from allocators GetAllocator does not reach (CUDA's caching allocator) cannot be
// dated this way: Python turns this on only in a process with no accelerator
// (set_births_by_allocation). The wrappers are installed once and stay (storages keep the
// allocator they were made by); outside blocks each costs two atomic loads an allocation.
std::atomic<bool> g_wrapped{false};  // the wrappers are in place
std::atomic<bool> g_by_allocation{false};  // Python's choice (set_births_by_allocation)

bool dating_now() {
  return g_blocks_now.load(std::memory_order_relaxed) != 0 &&
         g_by_allocation.load(std::memory_order_relaxed);
}

// The wrappers pass everything but allocate() to the allocator they wrap.
struct WrappingAllocator : c10::Allocator {
  c10::Allocator* inner = nullptr;
  bool is_simple_data_ptr(const c10::DataPtr& p) const override {
    return inner->is_simple_data_ptr(p);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
};

struct DatingAllocator final : WrappingAllocator {
  c10::DataPtr allocate(size_t n) override {
    const bool dating = dating_now();
    const int64_t epoch = g_epoch_now.load(std::memory_order_relaxed);
    // No bytes have no address to date (the allocator returns null): while a block is active,
    // an empty storage gets one byte, which it never shows (its nbytes stay 0, and a tensor
    // with no elements reports a null data_ptr() whatever its storage holds).
    c10::DataPtr p = inner->allocate(dating && n == 0 ? 1 : n);
    if (dating && p.get() != nullptr) {
      std::lock_guard<std::mutex> lock(g_births_mutex);
      if (g_active_blocks != 0) {
        g_allocated.set(p.get(), epoch);
      }
    }
    return p;
  }
};

// Meta memory has no address: while a block is active, its DataPtr (null, with no context)
// carries its epoch as the context instead, which nothing reads of a meta tensor.
struct MetaBirth {
  int64_t epoch;
};
void delete_meta_birth(void* context) {
  delete static_cast<MetaBirth*>(context);
}

struct MetaDatingAllocator final : WrappingAllocator {
  c10::DataPtr allocate(size_t n) override {
    const bool dating = dating_now();
    const int64_t epoch = g_epoch_now.load(std::memory_order_relaxed);
    c10::DataPtr p = inner->allocate(n);
    if (dating && p.get() == nullptr && p.get_context() == nullptr) {
      return c10::DataPtr(nullptr, new MetaBirth{epoch}, &delete_meta_birth, p.device());
    }
    return p;
  }
};

std::mutex g_foreign_mutex;
std::atomic<bool> g_foreign_seen{false};
int64_t g_foreign_epoch = 0;  // set once, under g_foreign_mutex, before g_foreign_seen

struct ForeignAllocator final : WrappingAllocator {
  c10::DataPtr allocate(size_t n) override {
    if (!g_foreign_seen.load(std::memory_order_acquire)) {
      // The first: its epoch, read before any memory of this kind is made through a wrapper,
      // is a lower bound of every such storage's birth.
      std::lock_guard<std::mutex> lock(g_foreign_mutex);
      if (!g_foreign_seen.load(std::memory_order_relaxed)) {
        g_foreign_epoch = g_epoch_now.load(std::memory_order_relaxed);
        g_foreign_seen.store(true, std::memory_order_release);
      }
    }
    return inner->allocate(n);
  }
};

constexpr size_t kDeviceTypes = static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES);
DatingAllocator g_dating;
MetaDatingAllocator g_meta_dating;
ForeignAllocator g_foreign[kDeviceTypes];
std::vector<std::string> g_wrapped_devices;

// What the allocators say of s (see born_of), with g_births_mutex held.
int64_t allocation_born_locked(const StorageImpl* s) {
  // Off: no evidence from allocation (older than any block, which refuses and never misses).
  if (!g_wrapped.load(std::memory_order_relaxed) ||
      !g_by_allocation.load(std::memory_order_relaxed)) {
    return 0;
  }
  const c10::Allocator* allocator = s->allocator();
  if (allocator == nullptr) return 0;
  if (allocator == &g_dating) {
    const void* data = s->data_ptr().get();
    // Bytes the CPU allocator made (its own deleter): not a shared or file mapping swapped into
    // the storage since (share_memory_), which may sit at an address stamped before.
    if (data == nullptr || s->data_ptr().get_deleter() != g_dating.inner->raw_deleter()) return 0;
    return g_allocated.get(data);
  }
  if (allocator == &g_meta_dating) {
    const auto* birth = s->data_ptr().cast_context<MetaBirth>(&delete_meta_birth);
    return birth == nullptr ? 0 : birth->epoch;
  }
  if (allocator >= &g_foreign[0] && allocator < &g_foreign[0] + kDeviceTypes &&
      g_foreign_seen.load(std::memory_order_acquire)) {
    return g_foreign_epoch;
  }
  return 0;
}

// A storage whose bytes were replaced (resized, in a write the block let through, or by
// UntypedStorage.resize_) keeps its birth: the allocator stamped its new bytes as new, but the
// storage, someone's tensor, is as old as it was. `born` is its birth before (0: none).
void keep_birth_of(const StorageImpl* s, int64_t born) {
  const void* data = s->data_ptr().get();
  if (data == nullptr) {
    // Resized to nothing: no bytes to carry the stamp, so the storage carries it, as a birth
    // by op does, until it has bytes again (FSDP2 empties the all-gather buffers it makes in
    // the first step after each use and grows them again: still the block's own memory).
    if (born != 0) record_birth(s, born);
    return;
  }
  if (s->allocator() != &g_dating) return;
  std::lock_guard<std::mutex> lock(g_births_mutex);
  g_allocated.set(data, born);  // 0: unstamped, as older than any block
}

// Wrap the allocator of every device GetAllocator knows now; false where CPU's is not ours to
// wrap (SetAllocator keeps one registered at a higher priority).
bool wrap_allocators() {
  if (g_wrapped.load(std::memory_order_relaxed)) return true;
  c10::Allocator* cpu = c10::GetAllocator(c10::DeviceType::CPU);
  // Its deleter tells its own bytes from others a storage may be given (allocation_born_locked).
  if (cpu == nullptr || cpu->raw_deleter() == nullptr) return false;
  g_dating.inner = cpu;
  c10::SetAllocator(c10::DeviceType::CPU, &g_dating, 0);
  if (c10::GetAllocator(c10::DeviceType::CPU) != &g_dating) return false;
  g_wrapped_devices.emplace_back("cpu");
  for (size_t i = 0; i < kDeviceTypes; ++i) {
    const auto type = static_cast<c10::DeviceType>(i);
    if (type == c10::DeviceType::CPU) continue;
    c10::Allocator* other = nullptr;
    try {
      other = c10::GetAllocator(type);
    } catch (const c10::Error&) {
      continue;  // none registered for this device
    }
    if (other == nullptr) continue;
    WrappingAllocator* wrapper =
        type == c10::DeviceType::Meta ? static_cast<WrappingAllocator*>(&g_meta_dating)
                                      : static_cast<WrappingAllocator*>(&g_foreign[i]);
    wrapper->inner = other;
    c10::SetAllocator(type, wrapper, 0);
    if (c10::GetAllocator(type) == wrapper) {
      g_wrapped_devices.push_back(c10::DeviceTypeName(type, /*lower_case=*/true));
    } else {
      // Kept at a higher priority: that device's memory cannot be dated by allocation, so
      // blocks date births by op, as after a first foreign allocation (from epoch 0, a lower
      // bound of everything).
      std::lock_guard<std::mutex> lock(g_foreign_mutex);
      g_foreign_seen.store(true, std::memory_order_release);
    }
  }
  g_wrapped.store(true, std::memory_order_relaxed);
  return true;
}

// Whether a block dates births by allocation now (see DatingAllocator).
bool births_by_allocation() {
  return g_wrapped.load(std::memory_order_relaxed) &&
         g_by_allocation.load(std::memory_order_relaxed) &&
         !g_foreign_seen.load(std::memory_order_relaxed) &&
         !c10::is_privateuse1_backend_registered();
}

bool is_readonly(const StorageImpl* s) {
  std::lock_guard<std::mutex> lock(g_readonly_mutex);
  auto it = g_readonly.find(s);
  return it != g_readonly.end() && !it->second.expired();
}

// The State of the guard serving this thread, held for the length of one op: a clone-mode
// guard entered inside an op (a custom op's Python kernel) hands the thread to the Python
// mode and drops the thread's own reference.
std::shared_ptr<State> current_state(ThreadLocals& local = t_local) {
  if (local.owned) {
    return local.owned;
  }
  if (!at::impl::ThreadLocalPythonObjects::contains(kStateKey)) {
    return nullptr;
  }
  const auto& obj = at::impl::ThreadLocalPythonObjects::get(kStateKey);
  PyObject* capsule = obj->ptr(getPyInterpreter());
  if (capsule == Py_None) {  // left, on a torch without erase (clear_thread_state)
    return nullptr;
  }
  return *static_cast<std::shared_ptr<State>*>(PyCapsule_GetContext(capsule));
}

// The torch.func wrappers (vmap's, grad's, functionalize's): their memory is under them, where
// Python finds it (immutorch._storage.memory_leaves).
const c10::DispatchKeySet kWrapperKeys({
    c10::DispatchKey::FuncTorchBatched,
    c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::Functionalize,
});

StorageImpl* storage_of(const at::Tensor& t) {
  if (!t.defined()) {
    return nullptr;
  }
  auto* impl = t.unsafeGetTensorImpl();
  if (!impl->has_storage() || impl->is_python_dispatch() || t.layout() != c10::kStrided) {
    return nullptr;
  }
  return impl->storage().unsafeGetStorageImpl();
}

// Whether Python must judge a write into t: its storage is protected, overlaps
// protected bytes, may be from outside a block, or is marked read-only. Tensors whose memory
// C++ cannot see here (sparse, subclasses, functorch wrappers) always go to Python.
bool may_be_protected(const State& st, const at::Tensor& t) {
  if (!t.defined()) {
    return false;
  }
  StorageImpl* s = storage_of(t);
  if (s == nullptr) {
    return true;
  }
  if (!st.protected_.empty() && st.protected_.count(s) != 0) {
    return true;
  }
  if (!st.ranges.empty()) {
    auto lo = reinterpret_cast<uintptr_t>(s->data_ptr().get());
    if (lo != 0) {
      auto hi = lo + s->nbytes();
      for (const auto& r : st.ranges) {
        if (r.first < hi && lo < r.second) {
          return true;
        }
      }
    }
  }
  if (st.block_start != 0 && born_of(s) < st.block_start) {
    return true;
  }
  if (g_readonly_count.load(std::memory_order_relaxed) != 0 && is_readonly(s)) {
    return true;
  }
  return false;
}

// Whether Python must judge a write of t's size or strides: t is a protected tensor object,
// or one whose memory C++ cannot see, or (in a block) memory from outside it. A view of
// protected memory may change its own shape: only the protected object itself is refused.
bool may_be_protected_object(const State& st, const at::Tensor& t) {
  if (!t.defined()) {
    return false;
  }
  auto* impl = t.unsafeGetTensorImpl();
  if (!st.objects.empty() && st.objects.count(impl) != 0) {
    return true;
  }
  StorageImpl* s = storage_of(t);
  if (s == nullptr || impl->key_set().has_any(kWrapperKeys)) {
    return true;
  }
  return st.block_start != 0 && born_of(s) < st.block_start;
}

template <typename F>
void each_tensor(const c10::IValue& v, F&& visit) {
  if (v.isTensor()) {
    visit(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) {
      visit(t);
    }
  } else if (v.isList()) {
    for (const c10::IValue& item : v.toListRef()) {
      each_tensor(item, visit);
    }
  } else if (v.isTuple()) {
    for (const c10::IValue& item : v.toTupleRef().elements()) {
      each_tensor(item, visit);
    }
  }
}

bool truthy(const c10::IValue& v) {
  if (v.isBool()) return v.toBool();
  if (v.isInt()) return v.toInt() != 0;
  if (v.isNone()) return false;
  return true;
}

[[noreturn]] void throw_python() {
  throw python_error();
}

// fn(args...), with the GIL held; a Python exception propagates as python_error.
template <typename... Args>
py::object call_python(PyObject* fn, Args&&... args) {
  PyObject* got = PyObject_CallFunctionObjArgs(fn, py::handle(args).ptr()..., nullptr);
  if (got == nullptr) {
    throw_python();
  }
  return py::reinterpret_steal<py::object>(got);
}

py::tuple python_args(const torch::jit::Stack& stack, size_t base, size_t n) {
  py::tuple args(n);
  for (size_t i = 0; i < n; ++i) {
    args[i] = torch::jit::toPyObject(stack[base + i]);
  }
  return args;
}

void compute_facts(const c10::OperatorHandle& op, Facts& f) {
  const auto& schema = op.schema();
  f.lift = schema.name() == "aten::lift_fresh";
  f.keep_key = op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd);
  if (f.keep_key) {
    f.composite_only = true;
    for (auto k : {c10::DispatchKey::CPU, c10::DispatchKey::CUDA, c10::DispatchKey::Meta,
                   c10::DispatchKey::MPS, c10::DispatchKey::XPU, c10::DispatchKey::QuantizedCPU,
                   c10::DispatchKey::SparseCPU, c10::DispatchKey::SparseCUDA,
                   c10::DispatchKey::NestedTensorCPU, c10::DispatchKey::NestedTensorCUDA,
                   c10::DispatchKey::MkldnnCPU, c10::DispatchKey::Autograd,
                   c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutogradCUDA,
                   c10::DispatchKey::AutogradNestedTensor,
                   c10::DispatchKey::CompositeExplicitAutograd,
                   c10::DispatchKey::CompositeExplicitAutogradNonFunctional}) {
      if (op.hasKernelForDispatchKey(k)) {
        f.composite_only = false;
        break;
      }
    }
  }
  bool known = false;
  {
    py::gil_scoped_acquire gil;
    PyObject* got = PyObject_CallFunction(
        g_facts_cb, "ss", schema.name().c_str(), schema.overload_name().c_str());
    if (got == nullptr) {
      throw_python();
    }
    py::object facts = py::reinterpret_steal<py::object>(got);
    if (!facts.is_none()) {
      known = true;
      auto t = facts.cast<py::tuple>();
      for (auto w : t[0].cast<py::list>()) {
        auto wt = w.cast<py::tuple>();
        f.writes.push_back({wt[0].cast<int>(), wt[1].cast<int>(), wt[2].cast<bool>()});
      }
      f.fresh = t[1].cast<bool>();
      f.view_of = t[2].cast<int>();
    }
  }
  if (!known) {
    // Not reachable as torch.ops.<ns>.<name>: read the declared writes from the schema.
    const auto& args = schema.arguments();
    for (size_t i = 0; i < args.size(); ++i) {
      const auto* info = args[i].alias_info();
      if (info != nullptr && info->isWrite()) {
        f.writes.push_back({static_cast<int>(i), -1, false});
      }
    }
    bool fresh = !schema.returns().empty();
    for (const auto& r : schema.returns()) {
      if (r.alias_info() != nullptr) fresh = false;
    }
    f.fresh = fresh;
  }
  f.ready = true;
}

bool declares_write(const c10::FunctionSchema& schema) {
  for (const auto& arg : schema.arguments()) {
    const auto* info = arg.alias_info();
    if (info != nullptr && info->isWrite()) return true;
  }
  return false;
}

// Whether an output may alias an input (a view, or an op that can return its argument).
bool returns_alias(const c10::FunctionSchema& schema) {
  for (const auto& ret : schema.returns()) {
    if (ret.alias_info() != nullptr) return true;
  }
  return false;
}

// Ops whose schemas mark the result as an alias of the input, though it is the input itself or
// new memory, never another view of it. CPU mm calls resolve_conj and resolve_neg on each
// operand: on a copy-on-write member, three fallbacks an mm for nothing to join.
bool never_a_new_view(const c10::FunctionSchema& schema) {
  const std::string& name = schema.name();
  return name == "aten::resolve_conj" || name == "aten::resolve_neg" ||
         name == "aten::contiguous";
}

// Whether every output is new memory (what _schema calls fresh_outputs).
bool fresh_returns(const c10::FunctionSchema& schema) {
  return !schema.returns().empty() && !returns_alias(schema);
}

Facts& facts_for(const c10::OperatorHandle& op, ThreadLocals& local) {
  const auto& schema = op.schema();
  Facts& f = local.facts[&schema];
  // Read again after any deregistration: a schema defined anew under the same name and
  // arguments (a custom op redefined with a write) may sit at the old one's address.
  const uint64_t generation = g_op_generation.load(std::memory_order_relaxed);
  if (f.ready && f.generation != generation) {
    f = Facts();
  }
  if (!f.ready) {
    c10::impl::ExcludeDispatchKeyGuard off(g_keys);
    compute_facts(op, f);
    f.generation = generation;
  }
  return f;
}

// The tensor that holds t's memory: the wrappers torch.func makes (vmap's BatchedTensor,
// functionalize's FunctionalTensorWrapper, grad's TensorWrapper) have no memory of their own.
// This key sits above functorch's, so a fresh output made under a transform arrives wrapped,
// and the block's birth belongs to the tensor underneath (which a later write is judged on).
// grad's TensorWrapper is declared in a header torch ships without its dependencies: such a
// leaf is left for Python to unwrap (only under grad-like transforms), as are subclasses.
const at::Tensor& memory_leaf(const at::Tensor& t) {
  const at::Tensor* leaf = &t;
  for (int depth = 0; depth < 64 && leaf->defined(); ++depth) {
    if (auto* batched = at::functorch::maybeGetBatchedImpl(*leaf)) {
      leaf = &batched->value();
    } else if (at::functionalization::impl::isFunctionalTensor(*leaf)) {
      leaf = &at::functionalization::impl::unsafeGetFunctionalWrapper(*leaf)->value();
    } else {
      break;
    }
  }
  return *leaf;
}

StorageImpl* unpack_storage(py::handle obj);

// The storages of an op's tensor arguments, read before it runs (see record_outputs).
using Inputs = c10::SmallVector<const StorageImpl*, 8>;

Inputs input_storages(const torch::jit::Stack& stack, size_t base, size_t nargs) {
  Inputs found;
  for (size_t i = base; i < base + nargs; ++i) {
    each_tensor(stack[i], [&](const at::Tensor& t) {
      if (StorageImpl* s = storage_of(t)) found.push_back(s);
    });
  }
  return found;
}

// Date the new memory an op with fresh outputs returned. An output over one of the op's own
// inputs' storages is not new, whatever the schema says: aten::_unsafe_view declares no alias
// and returns a view of its argument (found running kornia's suite under a block).
void record_outputs(
    const torch::jit::Stack& stack, size_t n, int64_t epoch, bool lift, const Inputs& inputs) {
  std::vector<at::Tensor> wrapped;
  for (size_t i = stack.size() - n; i < stack.size(); ++i) {
    each_tensor(stack[i], [&](const at::Tensor& out) {
      const at::Tensor& t = memory_leaf(out);
      if (!t.defined()) return;
      // grad's TensorWrapper, and tensor subclasses (DTensor: FSDP2's parameters and
      // optimizer state), whose __torch_dispatch__ makes their inner tensors below this key:
      // Python knows where their memory is (_storage.memory_leaves).
      if (t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper) ||
          t.unsafeGetTensorImpl()->is_python_dispatch()) {
        wrapped.push_back(t);
        return;
      }
      if (!t.unsafeGetTensorImpl()->has_storage()) return;
      StorageImpl* s = t.unsafeGetTensorImpl()->storage().unsafeGetStorageImpl();
      // lift_fresh also wraps memory that exists: torch.from_numpy (numpy's bytes are not
      // resizable, and record_birth never takes them for the block's own) and
      // torch.asarray(x.untyped_storage()) (x's own storage). A storage made for the new
      // tensor is held by it alone; more holders mean it was there before (as
      // _judge.lifted_fresh rules for the Python mode).
      if (lift && c10::raw::intrusive_ptr::use_count(s) > 1) return;
      // lift_fresh returns its argument, a constant made outside the dispatcher.
      if (!lift && std::find(inputs.begin(), inputs.end(), s) != inputs.end()) return;
      record_birth(s, epoch);
    });
  }
  if (wrapped.empty()) return;
  c10::impl::ExcludeDispatchKeyGuard off(g_keys);
  py::gil_scoped_acquire gil;
  for (const at::Tensor& t : wrapped) {
    py::object storages = call_python(g_leaves_cb, torch::jit::toPyObject(c10::IValue(t)));
    for (auto storage : storages) {
      record_birth(unpack_storage(storage), epoch);
    }
  }
}

PyObject* g_adopt_cb = nullptr;  // (alias, stats) -> None: the alias joins its group

// Hand the aliases waiting for their groups to Python (g_adopt_cb), then the views waiting in
// st.pending (g_join_cb), each with its source; an alias or a view already gone has nothing
// to move. Aliases first: a view's source may be one.
void join_pending(State& st) {
  auto pending = std::move(st.pending);
  st.pending.clear();
  c10::impl::ExcludeDispatchKeyGuard off(g_keys);
  py::gil_scoped_acquire gil;
  // Under the GIL, as alias_for adds to it (a thread sharing this State may run either).
  auto unadopted = std::move(st.unadopted);
  st.unadopted.clear();
  size_t done = 0;
  try {
    for (; done < unadopted.size(); ++done) {
      auto& [weak, stats] = unadopted[done];
      auto impl = weak.lock();
      if (impl) call_python(g_adopt_cb, torch::jit::toPyObject(c10::IValue(at::Tensor(impl))), stats);
      Py_DECREF(stats);
      stats = nullptr;
    }
  } catch (...) {
    for (auto& entry : unadopted) Py_XDECREF(entry.second);
    throw;
  }
  for (auto& [source, weak] : pending) {
    auto impl = weak.lock();
    if (!impl) continue;
    at::Tensor view(std::move(impl));
    call_python(g_join_cb, torch::jit::toPyObject(c10::IValue(source)),
                torch::jit::toPyObject(c10::IValue(view)));
  }
}

// Whether aliases or views wait to join their groups (join_pending).
bool waiting(const State& st) {
  return !st.pending.empty() || !st.unadopted.empty();
}

// Drop the waiting views already gone (and their sources) once there are many.
void prune_pending(State& st) {
  if (st.pending.size() < st.pending_prune_at) return;
  auto& p = st.pending;
  p.erase(std::remove_if(p.begin(), p.end(), [](const auto& e) { return e.second.expired(); }),
          p.end());
  st.pending_prune_at = std::max<size_t>(64, 2 * p.size());
}

bool carries_views_key(const at::Tensor& t) {
  return t.defined() && t.unsafeGetTensorImpl()->key_set().has(g_served[2].key);
}

// Join this thread's waiting views now (Python asks a tensor's group): with the GIL held.
void flush_pending() {
  const std::shared_ptr<State> st = current_state();
  if (st == nullptr || !waiting(*st)) return;
  py::gil_scoped_release nogil;  // join_pending takes the GIL itself
  join_pending(*st);
}

// The fallback on `key` (either of the two: they differ only in what falls through them).
void fallback_on(
    c10::DispatchKey key, const c10::OperatorHandle& op, c10::DispatchKeySet ks,
    torch::jit::Stack* stack) {
  // Below this key, and past the others: with two included, an op both see is this one's.
  const auto rest = (ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, key)) - g_keys;
  ThreadLocals& local = t_local;
  const std::shared_ptr<State> st = current_state(local);
  if (st == nullptr || !op.hasSchema()) {
    c10::impl::ExcludeDispatchKeyGuard off(g_keys);
    op.redispatchBoxed(rest, stack);
    return;
  }
  if (g_nkeys != 3 && waiting(*st)) {
    join_pending(*st);  // before this op's write, which may move the groups onto their copies
  }
  Facts& f = facts_for(op, local);
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  const size_t base = stack->size() - nargs;
  struct Older {
    StorageImpl* storage;
    const void* data;
    int64_t born;
  };
  c10::SmallVector<Older, 2> older;
  if (!f.writes.empty() && !f.composite_only) {
    bool judge = false;
    for (const auto& w : f.writes) {
      if (judge) break;
      if (static_cast<size_t>(w.position) >= nargs) continue;
      if (w.when >= 0 && !truthy((*stack)[base + w.when])) continue;
      each_tensor((*stack)[base + w.position], [&](const at::Tensor& t) {
        if (!judge && (w.meta ? may_be_protected_object(*st, t) : may_be_protected(*st, t))) {
          judge = true;
        }
      });
    }
    if (judge && st->by_allocation) {
      // Written storages from before the block whose bytes the op may replace (a resize)
      // once the judgement lets it through: they keep their birth (keep_birth_of).
      for (const auto& w : f.writes) {
        if (static_cast<size_t>(w.position) >= nargs) continue;
        each_tensor((*stack)[base + w.position], [&](const at::Tensor& t) {
          if (StorageImpl* s = storage_of(t)) {
            const int64_t born = born_of(s);
            if (born < st->block_start) older.push_back({s, s->data_ptr().get(), born});
          }
        });
      }
    }
    if (judge && waiting(*st)) {
      join_pending(*st);  // before the judgement, which may move the groups onto their copies
    }
    if (judge) {
      c10::impl::ExcludeDispatchKeyGuard off(g_keys);
      // Judged below torch.func's layers, as the Python mode (under functorch) judges: clone
      // mode's copy and its set_ onto the members must not be taken for the transformed
      // function's own ops ("mutate a captured Tensor" under grad).
      c10::impl::ExcludeDispatchKeyGuard below_functorch(c10::DispatchKeySet(
          {c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
           c10::DispatchKey::FuncTorchDynamicLayerBackMode}));
      py::gil_scoped_acquire gil;
      py::tuple args = python_args(*stack, base, nargs);
      // What C++ judged written, for an op Python cannot resolve to an OpOverload.
      py::list written;
      for (const auto& w : f.writes) {
        if (static_cast<size_t>(w.position) < nargs) {
          written.append(py::make_tuple(
              w.position, schema.arguments()[w.position].name(), w.when, w.meta));
        }
      }
      PyObject* got = PyObject_CallFunction(
          g_write_cb, "OssOO", st->py_state, schema.name().c_str(),
          schema.overload_name().c_str(), args.ptr(), written.ptr());
      if (got == nullptr) {
        throw_python();
      }
      Py_DECREF(got);
    }
  }
  const int64_t block_start = st->block_start;
  const int64_t epoch = st->epoch;
  const Inputs inputs =
      block_start != 0 && f.fresh ? input_storages(*stack, base, nargs) : Inputs();
  // Clone mode: a view of an alias joins the alias's group, so that the first write into it
  // moves the view onto the private copy with the rest (Python keeps the groups).
  c10::IValue view_source;
  if (st->clone && f.view_of >= 0 && static_cast<size_t>(f.view_of) < nargs) {
    const c10::IValue& source = (*stack)[base + f.view_of];
    // A member, or a view of one not joined yet: with three keys both carry the views key
    // (mark_member; views inherit their source's keys). A tensor that left its group (copied)
    // keeps the key, but its memory is private: not protected.
    if (source.isTensor() && may_be_protected(*st, source.toTensor()) &&
        (g_nkeys == 3 ? carries_views_key(source.toTensor()) : is_member(source.toTensor()))) {
      view_source = source;
    }
  }
  try {
    if (f.keep_key) {
      op.redispatchBoxed(rest, stack);
    } else {
      // A kernel's own temporaries (CPU addmm copies into an output it allocated without
      // the dispatcher) are not the user's writes: only composite ops are seen decomposed.
      c10::impl::ExcludeDispatchKeyGuard off(g_keys);
      op.redispatchBoxed(rest, stack);
    }
  } catch (const python_error&) {
    throw;  // from Python below this key (a refusal there is remembered by _policy itself)
  } catch (const std::exception&) {
    // The op's own error: a refusal remembered earlier on this thread must not be put back
    // in its place by the front doors (TorchScript rewraps errors; see _policy). Not only
    // c10::Error: torch 2.4's view throws std::runtime_error for a shape that does not fit.
    py::gil_scoped_acquire gil;
    if (PyObject_SetAttrString(st->py_state, "dispatch_error", Py_None) != 0) {
      PyErr_Clear();
    }
    throw;
  }
  for (const auto& o : older) {
    if (o.storage->data_ptr().get() != o.data) keep_birth_of(o.storage, o.born);
  }
  const size_t nret = schema.returns().size();
  if (block_start != 0 && f.fresh) {
    record_outputs(*stack, nret, epoch, f.lift, inputs);
  }
  if (view_source.isTensor()) {
    const at::Tensor& source = view_source.toTensor();
    for (size_t i = stack->size() - nret; i < stack->size(); ++i) {
      each_tensor((*stack)[i], [&](const at::Tensor& out) {
        // An op that returns its input itself (resolve_conj and resolve_neg, which CPU mm
        // calls on each operand, contiguous on a contiguous tensor) made no view to join.
        if (out.defined() && out.unsafeGetTensorImpl() != source.unsafeGetTensorImpl()) {
          st->pending.emplace_back(
              source, c10::weak_intrusive_ptr<c10::TensorImpl>(out.getIntrusivePtr()));
          prune_pending(*st);
        }
      });
    }
  }
}

template <int I>
void fallback_at(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  fallback_on(g_served[I].key, op, ks, stack);
}

// The keys that serve `st`, as a bit per g_served index.
unsigned wanted(const State& st) {
  const bool block = st.block_start != 0;
  if (g_nkeys == 3) {  // kBirths, kWrites; kViews is in the members' key sets (mark_member)
    return block && !st.by_allocation ? 0b001u : 0b010u;
  }
  if (g_nkeys == 2 && !block && !st.clone) return 0b010u;  // kEvery, kWrites
  return 0b001u;
}

// Put the keys in `bits` into this thread's TLS, and the others out.
void include_only(unsigned bits) {
  for (size_t i = 0; i < g_nkeys; ++i) {
    c10::impl::tls_set_dispatch_key_included(g_served[i].key, (bits >> i) & 1u);
  }
}

void include_key(const State& st) {
  include_only(wanted(st));
}

const c10::DispatchKey kCandidates[] = {
    c10::DispatchKey::TESTING_ONLY_GenericMode,
    c10::DispatchKey::TESTING_ONLY_GenericWrapper,
    c10::DispatchKey::DeferredInit,
};

StorageImpl* unpack_storage(py::handle obj) {
  if (!THPStorage_Check(obj.ptr())) {
    throw py::type_error("immutorch native: expected a torch.UntypedStorage");
  }
  return THPStorage_Unpack(obj.ptr()).unsafeGetStorageImpl();
}

}  // namespace

bool lets_through(Sees sees, const c10::FunctionSchema& schema) {
  if (sees == kEvery || declares_write(schema)) return false;
  switch (sees) {
    case kWrites:
      return true;
    case kViews:
      return !returns_alias(schema) || never_a_new_view(schema);
    case kBirths:  // lift_fresh wraps new memory made outside the dispatcher (torch.tensor)
      return !fresh_returns(schema) && schema.name() != "aten::lift_fresh" &&
             schema.name() != "aten::lift_fresh_copy";
    default:
      return false;
  }
}

// Register the fallback on the candidate keys nothing else has a fallback on (see Sees), with
// the fallthroughs of each; `undeclared` names the schemas immutorch._schema knows to write
// without saying so, which never fall through. Returns (key name, what it sees) for each, or
// raises (with the names of the keys found taken) when all are taken.
py::list install(
    py::object facts_cb, py::object write_cb, py::object leaves_cb, py::object join_cb,
    const std::vector<std::string>& undeclared) {
  auto names = [] {
    static const char* kSees[] = {"every op", "writes and fresh outputs", "writes", "writes and views"};
    py::list out;
    for (size_t i = 0; i < g_nkeys; ++i) {
      out.append(py::make_tuple(
          std::string(c10::toString(g_served[i].key)), std::string(kSees[g_served[i].sees])));
    }
    return out;
  };
  if (g_nkeys != 0) {
    return names();
  }
  std::string taken;
  std::vector<c10::DispatchKey> free;
  for (auto key : kCandidates) {
    if (c10::Dispatcher::singleton().hasBackendFallbackForDispatchKey(key)) {
      taken += (taken.empty() ? "" : ", ") + std::string(c10::toString(key));
    } else {
      free.push_back(key);
    }
  }
  if (free.empty()) {
    throw std::runtime_error("every candidate dispatch key has a fallback already: " + taken);
  }
  // Never removed (its handle leaked, so that nothing runs at exit): the listener lives as
  // long as the process, like the fallbacks.
  new c10::RegistrationHandleRAII(c10::Dispatcher::singleton().addRegistrationListener(
      std::make_unique<DeregistrationListener>()));
  g_facts_cb = facts_cb.release().ptr();
  g_write_cb = write_cb.release().ptr();
  g_leaves_cb = leaves_cb.release().ptr();
  g_join_cb = join_cb.release().ptr();
  const std::vector<Sees> roles = free.size() >= 3 ? std::vector<Sees>{kBirths, kWrites, kViews}
                                  : free.size() == 2 ? std::vector<Sees>{kEvery, kWrites}
                                                     : std::vector<Sees>{kEvery};
  const std::unordered_set<std::string> writers(undeclared.begin(), undeclared.end());
  const auto ops = c10::Dispatcher::singleton().getAllOpNames();
  for (size_t i = 0; i < roles.size(); ++i) {
    Key& k = g_served[i];
    k.key = free[i];
    k.sees = roles[i];
    k.fallback =
        std::make_unique<torch::Library>(torch::Library::IMPL, "_", k.key, __FILE__, __LINE__);
    k.fallback->fallback(
        i == 0   ? torch::CppFunction::makeFromBoxedFunction<&fallback_at<0>>()
        : i == 1 ? torch::CppFunction::makeFromBoxedFunction<&fallback_at<1>>()
                 : torch::CppFunction::makeFromBoxedFunction<&fallback_at<2>>());
    g_keys = g_keys | c10::DispatchKeySet(k.key);
    if (k.sees == kEvery) continue;
    k.aten =
        std::make_unique<torch::Library>(torch::Library::IMPL, "aten", k.key, __FILE__, __LINE__);
    for (const auto& name : ops) {
      if (name.name.rfind("aten::", 0) != 0 || writers.count(name.name) != 0) continue;
      auto op = c10::Dispatcher::singleton().findOp(name);
      if (!op || !op->hasSchema() || !lets_through(k.sees, op->schema())) continue;
      // impl() takes the name without its namespace: "add.Tensor", "relu".
      std::string rest = name.name.substr(6);
      if (!name.overload_name.empty()) rest += "." + name.overload_name;
      k.aten->impl(rest.c_str(), torch::CppFunction::makeFallthrough());
    }
  }
  g_nkeys = roles.size();
  return names();
}

// Enter (py_state given) or leave (None) on this thread.
void activate(py::object py_state) {
  if (py_state.is_none()) {
    include_only(0);
    clear_thread_state();
    t_local.owned.reset();
    return;
  }
  auto st = std::make_shared<State>();
  st->py_state = py_state.release().ptr();
  auto* holder = new std::shared_ptr<State>(st);
  PyObject* capsule = PyCapsule_New(st.get(), kStateKey, nullptr);
  if (capsule == nullptr) {
    delete holder;
    throw_python();
  }
  // The capsule's context keeps the State alive as long as any thread's copy of it exists.
  PyCapsule_SetContext(capsule, holder);
  PyCapsule_SetDestructor(capsule, [](PyObject* c) {
    delete static_cast<std::shared_ptr<State>*>(PyCapsule_GetContext(c));
  });
  at::impl::ThreadLocalPythonObjects::set(
      kStateKey, std::make_shared<c10::SafePyObject>(capsule, getPyInterpreter()));
  t_local.owned = st;
  include_key(*st);
}

// Mirror this thread's protections (see immutorch._backends.native.sync).
void sync_state(
    py::list storages, py::list objects, int64_t block_start, int64_t epoch, bool clone) {
  State* st = t_local.owned.get();
  if (st == nullptr) return;
  if (waiting(*st)) {
    py::gil_scoped_release nogil;  // join_pending takes the GIL itself
    join_pending(*st);
  }
  st->protected_.clear();
  st->ranges.clear();
  st->objects.clear();
  for (auto obj : objects) {
    if (!THPVariable_Check(obj.ptr())) {
      throw py::type_error("immutorch native: expected a torch.Tensor");
    }
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    if (t.defined()) {
      st->objects.insert(t.unsafeGetTensorImpl());
    }
  }
  for (auto obj : storages) {
    StorageImpl* s = unpack_storage(obj);
    st->protected_.emplace(s, c10::intrusive_ptr<StorageImpl>::reclaim_copy(s));
    auto lo = reinterpret_cast<uintptr_t>(s->data_ptr().get());
    if (lo != 0) st->ranges.emplace_back(lo, lo + s->nbytes());
  }
  // Before the count: an allocation dated once the block counts has the block's epoch or later.
  int64_t seen = g_epoch_now.load(std::memory_order_relaxed);
  while (seen < epoch && !g_epoch_now.compare_exchange_weak(seen, epoch)) {
  }
  if ((st->block_start != 0) != (block_start != 0)) {
    count_block(block_start != 0);
  }
  st->by_allocation = block_start != 0 && births_by_allocation();
  st->block_start = block_start;
  st->epoch = epoch;
  st->clone = clone;
  include_key(*st);
}

// Clone mode at a module call: whether any argument may have to cross as a copy-on-write alias
// (true: Python decides, as it would without this check). False only where the thread is served
// here and every argument is a scalar, None, a string, or a plain tensor whose memory C++ sees
// and knows to be unprotected: most module calls take the block's own activations, and asking
// Python about each cost ~4 us a call.
// None, a bool, an int, a float or a str: nothing a module call hands over or gives back.
bool plain_scalar(PyObject* v) {
  return v == Py_None || PyBool_Check(v) || PyLong_CheckExact(v) || PyFloat_CheckExact(v) ||
         PyUnicode_CheckExact(v);
}

bool may_hand_over_one(const State& st, PyObject* v) {
  if (plain_scalar(v)) return false;
  if (THPVariable_CheckExact(v)) {
    const at::Tensor& t = THPVariable_Unpack(v);
    if (t.defined() && t.unsafeGetTensorImpl()->key_set().has_any(kWrapperKeys)) {
      return true;  // a torch.func wrapper: Python finds the memory under it
    }
    return may_be_protected(st, t);
  }
  if (THPVariable_Check(v) || PyList_Check(v) || PyTuple_Check(v) || PyDict_Check(v)) {
    return true;  // a subclass, or a container Python rebuilds
  }
  // dataclasses.is_dataclass: Python rebuilds dataclass instances too
  PyObject* cls = PyType_Check(v) ? v : reinterpret_cast<PyObject*>(Py_TYPE(v));
  return PyObject_HasAttrString(cls, "__dataclass_fields__") != 0;
}

bool may_hand_over(py::handle args, py::handle kwargs) {
  std::shared_ptr<State> st = current_state();
  if (!st || !PyTuple_Check(args.ptr())) {
    return true;  // not served here: Python knows
  }
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(args.ptr()); i < n; ++i) {
    if (may_hand_over_one(*st, PyTuple_GET_ITEM(args.ptr(), i))) return true;
  }
  if (kwargs.is_none()) return false;
  if (!PyDict_Check(kwargs.ptr())) return true;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(kwargs.ptr(), &pos, &key, &value)) {
    if (may_hand_over_one(*st, value)) return true;
  }
  return false;
}

// -- module calls --------------------------------------------------------------------------
// Clone mode (and any guard that needs module boundaries) runs immutorch's shell around
// Module._call_impl at every module call, and most calls need nothing of it: quiet_call
// answers that common case in one call from the shell, as immutorch._boundaries._only_noted
// does in Python (STATE's attributes, the hand-over question). It answers true only where
// that function would; on anything it cannot read, false, and Python decides.
int immutorch_locals_on_stack(PyObject* code, PyObject* name, PyObject* out);

namespace {

PyObject* g_thread_state = nullptr;  // immutorch._registry.STATE, a threading.local
PyObject* g_call_impl_code = nullptr;  // the code of torch's Module._call_impl
PyObject* s_dict = nullptr;
PyObject* s_self = nullptr;
// ThreadState's attributes, in the order quiet_call reads them: any true one needs Python.
PyObject* s_busy[4] = {nullptr, nullptr, nullptr, nullptr};
PyObject* s_clone_frames = nullptr;

// What quiet_call reads, the Python ThreadState, and the code of torch's Module._call_impl,
// whose frames' `self` modules_on_stack reads.
void install_call_check(py::object thread_state, py::object call_impl_code) {
  auto intern = [](const char* text) {
    PyObject* s = PyUnicode_InternFromString(text);
    if (s == nullptr) throw py::error_already_set();
    return s;
  };
  if (s_dict == nullptr) {
    s_dict = intern("__dict__");
    s_self = intern("self");
    const char* busy[4] = {"watchers", "scoped_guards", "scoped_calls", "bypass"};
    for (int i = 0; i < 4; ++i) s_busy[i] = intern(busy[i]);
    s_clone_frames = intern("clone_frames");
  }
  Py_XDECREF(g_thread_state);
  g_thread_state = thread_state.release().ptr();
  Py_XDECREF(g_call_impl_code);
  g_call_impl_code = call_impl_code.release().ptr();
}

// One of the thread state's attributes, true or false; -1 where it is not there.
int truth_of(PyObject* dict, PyObject* name) {
  PyObject* value = PyDict_GetItemWithError(dict, name);
  if (value == nullptr) {
    PyErr_Clear();
    return -1;
  }
  int truth = PyObject_IsTrue(value);
  if (truth < 0) PyErr_Clear();
  return truth;
}

// What a module call through the shell needs, as classify reads the thread's state.
enum class Call {
  kQuiet,     // nothing: torch's _call_impl with the arguments as they came
  kHandOver,  // clone mode's hand-over of top-level tensor arguments, and nothing more
  kPython,    // Python's boundary work (_boundaries._boundary_call)
};

// Where clone mode may hand an argument over: kQuiet where none can cross (as may_hand_over
// answers false); kHandOver where every argument that may is a plain tensor at the top level
// (the module call needs only the hand-over of those: no container to rebuild, no subclass,
// no torch.func wrapper); kPython otherwise.
Call hand_over_need(const State& st, py::handle args, py::handle kwargs) {
  bool need = false;
  auto one = [&](PyObject* v) {
    if (!may_hand_over_one(st, v)) return true;
    if (!THPVariable_CheckExact(v)) return false;  // a container, a subclass, a dataclass
    const at::Tensor& t = THPVariable_Unpack(v);
    if (!t.defined() || t.unsafeGetTensorImpl()->key_set().has_any(kWrapperKeys)) return false;
    need = true;
    return true;
  };
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(args.ptr()); i < n; ++i) {
    if (!one(PyTuple_GET_ITEM(args.ptr(), i))) return Call::kPython;
  }
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  Py_ssize_t pos = 0;
  while (!kwargs.is_none() && PyDict_Next(kwargs.ptr(), &pos, &key, &value)) {
    if (!one(value)) return Call::kPython;
  }
  return need ? Call::kHandOver : Call::kQuiet;
}

Call classify_in(PyObject* dict, py::handle module, py::handle args, py::handle kwargs) {
  for (PyObject* name : s_busy) {
    if (truth_of(dict, name) != 0) return Call::kPython;  // a watch, a scoped call, aside
  }
  // torch.compile's wrapper module: is_compiled's cheap half, as _only_noted tests it
  if (std::strcmp(Py_TYPE(module.ptr())->tp_name, "OptimizedModule") == 0) return Call::kPython;
  int clone = truth_of(dict, s_clone_frames);
  if (clone == 0) return Call::kQuiet;
  if (clone < 0) return Call::kPython;
  std::shared_ptr<State> st = current_state();
  if (!st || !PyTuple_Check(args.ptr()) || !(kwargs.is_none() || PyDict_Check(kwargs.ptr()))) {
    return Call::kPython;  // not served here, or arguments Python must read
  }
  return hand_over_need(*st, args, kwargs);
}

// The thread's ThreadState attributes (its __dict__), a new reference; nullptr with no
// ThreadState installed; throws where Python fails to make this thread's.
PyObject* thread_state_dict() {
  if (g_thread_state == nullptr) return nullptr;
  PyObject* dict = PyObject_GetAttr(g_thread_state, s_dict);  // this thread's attributes
  if (dict == nullptr) {
    throw py::error_already_set();  // ThreadState() failed on a new thread: say so
  }
  if (!PyDict_Check(dict)) {
    Py_DECREF(dict);
    return nullptr;
  }
  return dict;
}

Call classify(py::handle module, py::handle args, py::handle kwargs) {
  PyObject* dict = thread_state_dict();
  if (dict == nullptr) return Call::kPython;
  Call call = classify_in(dict, module, args, kwargs);
  Py_DECREF(dict);
  return call;
}

// Whether the module call needs no boundary work at all (_boundaries._only_noted's answer).
bool quiet_call(py::handle module, py::handle args, py::handle kwargs) {
  return classify(module, args, kwargs) == Call::kQuiet;
}

// quiet_call as a plain CPython function: pybind11's argument dispatch cost ~1,600
// instructions a call, more than the answer itself.
PyObject* quiet_call_py(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 3) {
    PyErr_SetString(PyExc_TypeError, "quiet_call(module, args, kwargs) takes 3 arguments");
    return nullptr;
  }
  try {
    return PyBool_FromLong(quiet_call(argv[0], argv[1], argv[2]));
  } catch (py::error_already_set& err) {
    err.restore();
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
  }
  return nullptr;
}

// The `self` of each Module._call_impl running on this thread's stack, innermost first (the
// modules in call, for module state: immutorch._arguments.modules_on_stack), read without
// building each frame's f_locals; None where frames.cpp cannot read this Python's frames.
PyObject* modules_on_stack_py(PyObject*, PyObject* const*, Py_ssize_t argc) {
  if (argc != 0) {
    PyErr_SetString(PyExc_TypeError, "modules_on_stack() takes no arguments");
    return nullptr;
  }
  if (g_call_impl_code == nullptr) Py_RETURN_NONE;
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  int done = immutorch_locals_on_stack(g_call_impl_code, s_self, out);
  if (done == 0) return out;
  Py_DECREF(out);
  if (done == -1) Py_RETURN_NONE;
  return nullptr;
}

PyMethodDef modules_on_stack_def = {
    "modules_on_stack",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&modules_on_stack_py)), METH_FASTCALL,
    "() -> the modules whose Module.__call__ runs on this thread, innermost first, or None"};

// The module-call shell's common cases in one C call: torch's Module._call_impl, while the
// shell is on, runs `__immutorch_module_call__(self, args, kwargs)` (immutorch._boundaries),
// which is this where the native backend is loaded (Dynamo never calls it: the shell's code
// calls torch's own while Dynamo traces). Where the call needs nothing (classify), torch's
// own _call_impl (g_shell_inner) is called straight from here, with the arguments as they
// came. Where it needs only clone mode's hand-over of top-level tensor arguments, each that
// may be protected goes to Python's g_shell_hand_over (the alias it crosses as, or itself),
// the call gets the aliases, and its result goes through g_shell_back (a caller's tensor
// back for an alias that still shows it), with nothing put on record: messages find the
// module and the parameter on the interpreter stack, as for a quiet call. Anything else is
// Python's boundary work (g_shell_boundary(module, args, kwargs, inner)). While torch traces
// outside Dynamo (torch.compiler.is_compiling(): non-strict export, a compile session), torch's
// own, as the shell's code did before it asked Dynamo alone.
PyObject* g_shell_inner = nullptr;
PyObject* g_shell_boundary = nullptr;
PyObject* g_shell_hand_over = nullptr;
PyObject* g_shell_back = nullptr;
PyObject* g_compiler_dict = nullptr;  // torch.compiler's globals, for _is_compiling_flag
PyObject* s_compiling_flag = nullptr;

void install_shell(py::object inner, py::object boundary, py::object hand_over, py::object back) {
  if (s_compiling_flag == nullptr) {
    s_compiling_flag = PyUnicode_InternFromString("_is_compiling_flag");
    if (s_compiling_flag == nullptr) throw py::error_already_set();
    py::object compiler = py::module_::import("torch.compiler");
    g_compiler_dict = py::getattr(compiler, "__dict__").release().ptr();
  }
  auto set = [](PyObject*& slot, py::object& value) {
    Py_XDECREF(slot);
    slot = value.release().ptr();
  };
  set(g_shell_inner, inner);
  set(g_shell_boundary, boundary);
  set(g_shell_hand_over, hand_over);
  set(g_shell_back, back);
}

// torch.compiler.is_compiling() outside Dynamo: its flag (TorchScript never runs this).
bool torch_compiling() {
  PyObject* flag = PyDict_GetItemWithError(g_compiler_dict, s_compiling_flag);
  if (flag == nullptr) {
    PyErr_Clear();
    return false;
  }
  return flag == Py_True;
}

// inner(module, *args, **kwargs), the arguments as given (a borrowed array of n).
PyObject* call_inner(PyObject* module, PyObject* const* args, Py_ssize_t n, PyObject* kwargs) {
  // One slot before the arguments, which the callee may use (PY_VECTORCALL_ARGUMENTS_OFFSET).
  c10::SmallVector<PyObject*, 8> stack(static_cast<size_t>(n) + 2);
  stack[1] = module;
  for (Py_ssize_t i = 0; i < n; ++i) stack[static_cast<size_t>(i) + 2] = args[i];
  return PyObject_VectorcallDict(
      g_shell_inner, stack.data() + 1, static_cast<size_t>(n + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
      kwargs != nullptr && PyDict_GET_SIZE(kwargs) > 0 ? kwargs : nullptr);
}

// (alias, the caller's tensor it was handed over for), borrowed: both alive during the call.
using Crossed = c10::SmallVector<std::pair<PyObject*, PyObject*>, 4>;

// _clone.shows_caller: the alias still shows exactly the caller's tensor (the same memory, not
// clone mode's private copy, and the same size, strides, offset and dtype).
bool shows_caller(PyObject* alias, PyObject* original) {
  const at::Tensor& a = THPVariable_Unpack(alias);
  const at::Tensor& o = THPVariable_Unpack(original);
  return a.defined() && o.defined() && a.has_storage() && o.has_storage() &&
         a.storage().unsafeGetStorageImpl() == o.storage().unsafeGetStorageImpl() &&
         a.sym_sizes() == o.sym_sizes() && a.sym_strides() == o.sym_strides() &&
         a.sym_storage_offset() == o.sym_storage_offset() && a.dtype() == o.dtype();
}

// What back_to_caller makes of one item C++ can read (a tensor, None, a number, a string):
// a new reference; nullptr for anything else (Python walks it).
PyObject* back_item(PyObject* v, const Crossed& crossed) {
  if (THPVariable_Check(v)) {
    for (const auto& [alias, original] : crossed) {
      if (alias == v && shows_caller(alias, original)) {
        Py_INCREF(original);
        return original;
      }
    }
  } else if (!plain_scalar(v)) {
    return nullptr;
  }
  Py_INCREF(v);
  return v;
}

// back_to_caller(out, ...) for a result that is one such item or a plain tuple of them (most
// modules' results); nullptr where Python must walk it (no error set).
PyObject* back_fast(PyObject* out, const Crossed& crossed) {
  if (!PyTuple_CheckExact(out)) return back_item(out, crossed);
  const Py_ssize_t n = PyTuple_GET_SIZE(out);
  c10::SmallVector<py::object, 8> items;
  bool changed = false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(out, i);
    PyObject* got = back_item(item, crossed);
    if (got == nullptr) return nullptr;
    changed = changed || got != item;
    items.push_back(py::reinterpret_steal<py::object>(got));
  }
  if (!changed) {
    Py_INCREF(out);
    return out;
  }
  PyObject* tuple = PyTuple_New(n);
  if (tuple == nullptr) throw py::error_already_set();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyTuple_SET_ITEM(tuple, i, items[static_cast<size_t>(i)].release().ptr());
  }
  return tuple;
}

// Clone mode's hand-over of top-level tensor arguments (Call::kHandOver), then the call.
PyObject* hand_over_call(const State& st, PyObject* module, PyObject* args, PyObject* kwargs) {
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  Crossed aliased;  // each alias made, with the caller's tensor
  // A tensor passed twice (f(x, x), attention's query is key) crosses as one alias, as
  // _arguments.replace_call hands it over: the callee may test identity.
  c10::SmallVector<std::pair<PyObject*, PyObject*>, 4> asked;  // borrowed: args, crossed
  // Each tensor argument to ask Python about: those whose memory C++ cannot rule out.
  auto cross = [&](PyObject* v) -> PyObject* {  // a new reference, or nullptr on error
    if (!THPVariable_CheckExact(v) || !may_be_protected(st, THPVariable_Unpack(v))) {
      Py_INCREF(v);
      return v;
    }
    for (const auto& [given, got] : asked) {
      if (given == v) {
        Py_INCREF(got);
        return got;
      }
    }
    PyObject* got = PyObject_CallOneArg(g_shell_hand_over, v);
    if (got != nullptr) asked.emplace_back(v, got);  // both alive: the arguments and crossed
    if (got != nullptr && got != v) aliased.emplace_back(got, v);
    return got;
  };
  c10::SmallVector<py::object, 8> crossed;
  crossed.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* got = cross(PyTuple_GET_ITEM(args, i));
    if (got == nullptr) return nullptr;
    crossed.push_back(py::reinterpret_steal<py::object>(got));
  }
  py::object new_kwargs;
  if (PyDict_GET_SIZE(kwargs) > 0) {
    PyObject* copy = PyDict_New();
    if (copy == nullptr) return nullptr;
    new_kwargs = py::reinterpret_steal<py::object>(copy);
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs, &pos, &key, &value)) {
      PyObject* got = cross(value);
      if (got == nullptr) return nullptr;
      const int failed = PyDict_SetItem(copy, key, got);
      Py_DECREF(got);
      if (failed != 0) return nullptr;
    }
  }
  c10::SmallVector<PyObject*, 8> plain(static_cast<size_t>(n));
  for (size_t i = 0; i < plain.size(); ++i) plain[i] = crossed[i].ptr();
  PyObject* out = call_inner(module, plain.data(), n, new_kwargs ? new_kwargs.ptr() : kwargs);
  if (out == nullptr || aliased.empty()) return out;
  py::object result = py::reinterpret_steal<py::object>(out);
  if (PyObject* fast = back_fast(out, aliased)) return fast;
  py::dict originals;  // id(alias) -> the caller's tensor
  for (const auto& [alias, original] : aliased) {
    py::object id = py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(alias));
    if (!id || PyDict_SetItem(originals.ptr(), id.ptr(), original) != 0) return nullptr;
  }
  return PyObject_CallFunctionObjArgs(g_shell_back, out, originals.ptr(), nullptr);
}

PyObject* module_call_py(PyObject*, PyObject* const* argv, Py_ssize_t argc) {
  if (argc != 3 || !PyTuple_Check(argv[1]) || !PyDict_Check(argv[2])) {
    PyErr_SetString(PyExc_TypeError, "module_call(module, args: tuple, kwargs: dict)");
    return nullptr;
  }
  if (g_shell_inner == nullptr || g_shell_boundary == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "immutorch native: module_call before install_shell");
    return nullptr;
  }
  PyObject* const module = argv[0];
  PyObject* const args = argv[1];
  PyObject* const kwargs = argv[2];
  try {
    Call call = torch_compiling() ? Call::kQuiet : classify(module, args, kwargs);
    if (call == Call::kQuiet) {
      return call_inner(module, PySequence_Fast_ITEMS(args), PyTuple_GET_SIZE(args), kwargs);
    }
    if (call == Call::kHandOver) {
      const std::shared_ptr<State> st = current_state();  // classify found it
      if (st != nullptr) return hand_over_call(*st, module, args, kwargs);
    }
  } catch (py::error_already_set& err) {
    err.restore();
    return nullptr;
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
    return nullptr;
  }
  PyObject* call[4] = {module, args, kwargs, g_shell_inner};
  return PyObject_Vectorcall(g_shell_boundary, call, 4, nullptr);
}

PyMethodDef module_call_def = {
    "module_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&module_call_py)),
    METH_FASTCALL, "(module, args, kwargs) -> the module call through the shell"};

PyMethodDef quiet_call_def = {
    "quiet_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&quiet_call_py)),
    METH_FASTCALL, "(module, args, kwargs) -> True where the module call needs no boundary"};

}  // namespace

// A tensor joins a copy-on-write group (see g_members).
void mark_member(py::handle obj) {
  if (!THPVariable_Check(obj.ptr())) {
    throw py::type_error("immutorch native: expected a torch.Tensor");
  }
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  if (!t.defined()) return;
  if (g_nkeys == 3) {
    c10::DispatchKeySet& keys = KeySetOf::of(t.unsafeGetTensorImpl());
    keys = keys.add(g_served[2].key);
  }
  std::lock_guard<std::mutex> lock(g_members_mutex);
  g_members.insert_or_assign(
      t.unsafeGetTensorImpl(), c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()));
  if (g_members.size() >= g_members_prune_at) {
    for (auto i = g_members.begin(); i != g_members.end();) {
      i = i->second.expired() ? g_members.erase(i) : std::next(i);
    }
    g_members_prune_at = std::max<size_t>(64, 2 * g_members.size());
  }
}

// Clone mode's alias of a plain tensor that requires no grad (immutorch._clone.alias): a new
// TensorImpl over x's storage, offset, sizes and strides, made past immutorch's keys and any
// Python mode as _clone._raw_alias makes it, a member of its copy-on-write group at once for
// the C++ side (mark_member), and adopted into the group by Python only where one is needed
// (State::unadopted). None where this thread is not served here (Python makes the alias).
py::object alias_for(py::handle obj, py::handle stats) {
  if (!THPVariable_CheckExact(obj.ptr())) {
    throw py::type_error("immutorch native: alias_for takes a plain torch.Tensor");
  }
  const std::shared_ptr<State> st = current_state();
  if (st == nullptr || g_adopt_cb == nullptr) return py::none();
  const at::Tensor& x = THPVariable_Unpack(obj.ptr());
  at::Tensor out;
  {
    c10::impl::ExcludeDispatchKeyGuard off(
        g_keys | c10::DispatchKeySet(
                     {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
    at::NoGradGuard no_grad;
    out = at::empty({0}, x.options());
    out.set__symint(x.storage(), x.sym_storage_offset(), x.sym_sizes(), x.sym_strides());
  }
  py::object alias = py::reinterpret_steal<py::object>(THPVariable_Wrap(out));
  if (!alias) throw py::error_already_set();
  mark_member(alias);
  auto& waiting = st->unadopted;
  if (waiting.size() >= st->unadopted_prune_at) {  // a long block that only reads: drop the gone
    auto gone = std::stable_partition(
        waiting.begin(), waiting.end(), [](const auto& e) { return !e.first.expired(); });
    for (auto i = gone; i != waiting.end(); ++i) Py_DECREF(i->second);
    waiting.erase(gone, waiting.end());
    st->unadopted_prune_at = std::max<size_t>(64, 2 * waiting.size());
  }
  Py_INCREF(stats.ptr());
  waiting.emplace_back(c10::weak_intrusive_ptr<c10::TensorImpl>(out.getIntrusivePtr()), stats.ptr());
  return alias;
}

namespace {

// -- x.data: a view no dispatcher reports ------------------------------------------------------
// TensorBase.data makes a view of its tensor without dispatching an op, so a member's .data
// must be joined to the member's group where it is made. Python could put a property in front
// of it on torch.Tensor, but each change to a class invalidates the attribute caches of it and
// of every subclass, and from CPython 3.13 a class changed 1,000 times is never cached again:
// one clone guard in a loop would leave every tensor's lookups slower for good. Instead, the
// descriptor itself (one object, torch's) is pointed at a copy of its PyGetSetDef whose getter
// is this one while a clone frame is active anywhere: torch's getter makes the view, and a
// member's goes to Python to join the member's group, as a view op's does (g_join_cb).
PyGetSetDef* g_data_torch = nullptr;  // torch's own definition, never written
PyGetSetDef g_data_ours{};

bool is_member(PyObject* self) {
  if (!THPVariable_Check(self)) return false;
  const at::Tensor& t = THPVariable_Unpack(self);
  if (!t.defined()) return false;
  std::lock_guard<std::mutex> lock(g_members_mutex);
  auto found = g_members.find(t.unsafeGetTensorImpl());
  return found != g_members.end() && !found->second.expired();
}

// flush_pending for a caller in Python: false with the Python error set where it failed.
bool flush_pending_for_python() {
  try {
    flush_pending();
    return true;
  } catch (python_error& err) {
    err.restore();
  } catch (py::error_already_set& err) {
    err.restore();
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
  }
  return false;
}

PyObject* flush_views_py(PyObject*, PyObject*) {
  if (!flush_pending_for_python()) return nullptr;
  Py_RETURN_NONE;
}

PyMethodDef flush_views_def = {
    "flush_views", &flush_views_py, METH_NOARGS,
    "() -> None: this thread's waiting views of members join their groups now"};

PyObject* data_get(PyObject* self, void* closure) {
  PyObject* out = g_data_torch->get(self, closure);
  if (out == nullptr || g_join_cb == nullptr) return out;
  if (!flush_pending_for_python()) {  // self may be a view waiting to join
    Py_DECREF(out);
    return nullptr;
  }
  if (!is_member(self)) return out;
  PyObject* joined = PyObject_CallFunctionObjArgs(g_join_cb, self, out, nullptr);
  if (joined == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  Py_DECREF(joined);
  return out;
}

PyGetSetDescrObject* data_descriptor(py::handle descr) {
  if (!PyObject_TypeCheck(descr.ptr(), &PyGetSetDescr_Type)) {
    throw py::type_error("immutorch native: expected TensorBase's `data` getset descriptor");
  }
  return reinterpret_cast<PyGetSetDescrObject*>(descr.ptr());
}

// Point TensorBase.data (`descr`) at data_get (on) or back at torch's definition (off).
// Called with the GIL held, as every getter runs: no getter sees a half-made definition.
void watch_data(py::handle descr, bool on) {
  PyGetSetDescrObject* d = data_descriptor(descr);
  if (on) {
    if (d->d_getset == &g_data_ours) return;
    if (g_data_torch == nullptr) {
      g_data_torch = d->d_getset;
      g_data_ours = *g_data_torch;
      g_data_ours.get = &data_get;
    }
    d->d_getset = &g_data_ours;
  } else if (d->d_getset == &g_data_ours) {
    d->d_getset = g_data_torch;
  }
}

bool data_watched(py::handle descr) {
  return data_descriptor(descr)->d_getset == &g_data_ours;
}

}  // namespace

int64_t born(py::object storage) {
  return born_of(unpack_storage(storage));
}

void mark_readonly(py::object storage, bool on) {
  StorageImpl* s = unpack_storage(storage);
  std::lock_guard<std::mutex> lock(g_readonly_mutex);
  if (on) {
    g_readonly.insert_or_assign(
        s,
        c10::weak_intrusive_ptr<StorageImpl>(c10::intrusive_ptr<StorageImpl>::reclaim_copy(s)));
  } else {
    g_readonly.erase(s);
  }
  for (auto i = g_readonly.begin(); i != g_readonly.end();) {
    i = i->second.expired() ? g_readonly.erase(i) : std::next(i);
  }
  g_readonly_count.store(g_readonly.size(), std::memory_order_relaxed);
}

// The names of the keys that serve this thread now ("A+B" for two), "" where none is in its TLS.
std::string serving() {
  std::string out;
  for (size_t i = 0; i < g_nkeys; ++i) {
    if (c10::impl::tls_is_dispatch_key_included(g_served[i].key)) {
      out += (out.empty() ? "" : "+") + std::string(c10::toString(g_served[i].key));
    }
  }
  return out;
}

bool enabled() {
  return !serving().empty();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install);
  m.def("activate", &activate);
  m.def("sync", &sync_state);
  m.def("born", &born);
  m.def("keep_birth", [](py::object storage, int64_t born) {
    keep_birth_of(unpack_storage(storage), born);
  });
  m.def("mark_member", &mark_member);
  m.def("alias_for", &alias_for);
  m.def("install_adopt", [](py::object adopt) {
    Py_XDECREF(g_adopt_cb);
    g_adopt_cb = adopt.release().ptr();
  });
  m.add_object("flush_views",
               py::reinterpret_steal<py::object>(PyCFunction_New(&flush_views_def, nullptr)));
  m.def("watch_data", &watch_data);
  m.def("data_watched", &data_watched);
  m.def("may_hand_over", &may_hand_over);
  m.def("install_call_check", &install_call_check);
  m.add_object("quiet_call",
               py::reinterpret_steal<py::object>(PyCFunction_New(&quiet_call_def, nullptr)));
  m.def("install_shell", &install_shell);
  m.add_object("module_call",
               py::reinterpret_steal<py::object>(PyCFunction_New(&module_call_def, nullptr)));
  m.add_object("modules_on_stack",
               py::reinterpret_steal<py::object>(PyCFunction_New(&modules_on_stack_def, nullptr)));
  m.def("mark_readonly", &mark_readonly);
  m.def("enabled", &enabled);
  m.def("serving", &serving);
  m.def("set_births_by_allocation", [](bool on) {
    // Where the allocators cannot be wrapped, blocks date births by op, as before.
    g_by_allocation.store(on && wrap_allocators(), std::memory_order_relaxed);
    return g_by_allocation.load(std::memory_order_relaxed);
  });
  m.def("births_by_allocation", &births_by_allocation);
  m.def("wrapped_devices", [] { return g_wrapped_devices; });
  m.def("op_generation", [] { return g_op_generation.load(std::memory_order_relaxed); });
}

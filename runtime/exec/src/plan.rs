//! Running a graph in clear: a specialized graph is turned into a flat schedule once, then
//! run many times. Values are dropped right after their last use.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhe_ir::{specialize, Fact, Graph, LinearCall, NodeBody, NodeId, Op, OutletId, Stage, Tensor};

use crate::backend::{LinearBackend, Sealed};
use crate::ExecError;

/// What a value slot holds while a plan runs.
enum Value {
    Clear(Arc<Tensor>),
    /// Between the seal and open stages of a server call; has exactly one reader.
    Sealed(Sealed),
}

impl Value {
    fn clear(&self) -> Result<&Tensor, ExecError> {
        match self {
            Value::Clear(t) => Ok(t),
            Value::Sealed(_) => Err(ExecError::Backend("a sealed value reached a clear op".into())),
        }
    }
}

/// One scheduled op: where its operands are and where its results go.
struct Step {
    node: NodeId,
    op: Arc<dyn Op>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    /// Value slots whose last reader is this step.
    release: Vec<usize>,
}

/// Wall time of the steps a plan ran, by op kind for clear ops and by stage for server
/// calls (`server call: seal` …), summed over runs.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub entries: BTreeMap<String, Duration>,
    /// Most bytes of clear values (constants included) alive at once during a run.
    pub peak_live_bytes: usize,
    /// The largest values alive at that moment: (producing node, bytes), largest first.
    pub peak_values: Vec<(String, usize)>,
    /// The process's peak resident memory (Linux `VmHWM`; absent elsewhere).
    pub rss_peak: Option<RssPeak>,
    /// Time spent keeping this profile (counting bytes, reading `VmHWM`) between steps: part
    /// of a profiled run's wall time, in none of the entries.
    pub bookkeeping: Duration,
}

#[derive(Clone, Debug)]
pub struct RssPeak {
    pub bytes: usize,
    /// The step after which it last grew; `None` if it did not grow while profiling.
    pub grew_at: Option<String>,
}

/// This process's peak resident memory so far, in bytes (Linux only).
fn peak_resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: usize = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

impl Profile {
    fn record(&mut self, key: &str, time: Duration) {
        *self.entries.entry(key.to_string()).or_default() += time;
    }
}

/// Profile key of a server-call stage.
pub fn stage_key(stage: Stage) -> &'static str {
    match stage {
        Stage::Seal => "server call: seal",
        Stage::Apply => "server call: apply",
        Stage::Open => "server call: open",
    }
}

/// A schedule for one set of input shapes.
pub struct Plan {
    graph: Graph,
    steps: Vec<Step>,
    /// Constants, placed into their slots at the start of each run.
    constants: Vec<(usize, Arc<Tensor>)>,
    inputs: Vec<(String, usize, Fact)>,
    outputs: Vec<(String, usize)>,
    n_slots: usize,
    /// The node whose output each slot holds.
    slot_owner: Vec<NodeId>,
}

impl Plan {
    pub fn new(graph: &Graph, shapes: &HashMap<String, Vec<usize>>) -> Result<Plan, ExecError> {
        let spec = specialize(graph, shapes)?;
        let graph = spec.graph;
        let mut slot_of: HashMap<OutletId, usize> = HashMap::new();
        let mut slot_owner = Vec::new();
        let order = graph.demand_order()?;
        for &id in &order {
            for slot in 0..graph.node(id).n_outputs {
                let next = slot_of.len();
                slot_of.insert(OutletId::new(id, slot), next);
                slot_owner.push(id);
            }
        }
        let mut last_reader: HashMap<usize, usize> = HashMap::new();
        let mut steps = Vec::new();
        let mut constants = Vec::new();
        let mut inputs = Vec::new();
        for &id in &order {
            let node = graph.node(id);
            match &node.body {
                NodeBody::Input(_) => {
                    let outlet = OutletId::new(id, 0);
                    inputs.push((node.name.clone(), slot_of[&outlet], spec.facts[&outlet].clone()));
                }
                NodeBody::Const(value) => constants.push((slot_of[&OutletId::new(id, 0)], value.clone())),
                NodeBody::Op(op) => {
                    let step_inputs: Vec<usize> = node.inputs.iter().map(|i| slot_of[i]).collect();
                    for &s in &step_inputs {
                        last_reader.insert(s, steps.len());
                    }
                    steps.push(Step {
                        node: id,
                        op: op.clone(),
                        inputs: step_inputs,
                        outputs: (0..node.n_outputs).map(|s| slot_of[&OutletId::new(id, s)]).collect(),
                        release: vec![],
                    });
                }
            }
        }
        let outputs: Vec<(String, usize)> = graph.outputs().iter().map(|o| (o.name.clone(), slot_of[&o.outlet])).collect();
        for (slot, step) in last_reader {
            if !outputs.iter().any(|(_, s)| *s == slot) {
                steps[step].release.push(slot);
            }
        }
        Ok(Plan { graph, steps, constants, inputs, outputs, n_slots: slot_of.len(), slot_owner })
    }

    /// Facts of the graph inputs this plan was made for.
    pub fn input_facts(&self) -> impl Iterator<Item = (&str, &Fact)> {
        self.inputs.iter().map(|(n, _, f)| (n.as_str(), f))
    }

    /// Runs the plan; inputs by name, outputs in graph order. Graphs with server calls
    /// need `backend`.
    pub fn run(&self, inputs: HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>, ExecError> {
        self.run_with(inputs, None)
    }

    pub fn run_with(&self, inputs: HashMap<String, Tensor>, backend: Option<&dyn LinearBackend>) -> Result<Vec<(String, Tensor)>, ExecError> {
        self.run_profiled(inputs, backend, None)
    }

    /// Runs the plan, adding the time of each step to `profile` when one is given.
    pub fn run_profiled(
        &self,
        mut inputs: HashMap<String, Tensor>,
        backend: Option<&dyn LinearBackend>,
        mut profile: Option<&mut Profile>,
    ) -> Result<Vec<(String, Tensor)>, ExecError> {
        let mut slots: Vec<Option<Value>> = (0..self.n_slots).map(|_| None).collect();
        for (slot, value) in &self.constants {
            slots[*slot] = Some(Value::Clear(value.clone()));
        }
        for (name, slot, fact) in &self.inputs {
            let value = inputs
                .remove(name)
                .ok_or_else(|| ExecError::MissingInput { name: name.clone(), expected: fact.to_string() })?;
            if value.dtype() != fact.dtype || value.shape() != fact.shape.as_slice() {
                return Err(ExecError::InputType {
                    name: name.clone(),
                    expected: fact.to_string(),
                    found: format!("{}{:?}", value.dtype(), value.shape()),
                });
            }
            slots[*slot] = Some(Value::Clear(Arc::new(value)));
        }
        if let Some(name) = inputs.keys().next() {
            return Err(ExecError::UnknownInput { name: name.clone(), known: self.inputs.iter().map(|i| i.0.clone()).collect() });
        }
        for step in &self.steps {
            let node = self.graph.node(step.node);
            let started = Instant::now();
            let results = match step.op.linear_call() {
                Some(call) => vec![self.server_stage(call, step, &mut slots, backend)?],
                None => {
                    let operands = step
                        .inputs
                        .iter()
                        .map(|&s| slots[s].as_ref().expect("scheduled after its inputs").clear())
                        .collect::<Result<Vec<&Tensor>, _>>()?;
                    let results = step.op.eval(&operands).map_err(|e| e.in_node(&node.name, step.op.kind()))?;
                    results.into_iter().map(|t| Value::Clear(Arc::new(t))).collect()
                }
            };
            for (slot, value) in step.outputs.iter().zip(results) {
                slots[*slot] = Some(value);
            }
            for &slot in &step.release {
                slots[slot] = None;
            }
            if let Some(profile) = profile.as_deref_mut() {
                let key = step.op.linear_call().map_or(step.op.kind(), |call| stage_key(call.stage));
                profile.record(key, started.elapsed());
                let bookkeeping = Instant::now();
                self.record_memory(&slots, &node.name, key, profile);
                profile.bookkeeping += bookkeeping.elapsed();
            }
        }
        self.outputs
            .iter()
            .map(|(name, slot)| {
                let value = match slots[*slot].take().expect("outputs are computed") {
                    Value::Clear(t) => Arc::try_unwrap(t).unwrap_or_else(|shared| (*shared).clone()),
                    Value::Sealed(_) => return Err(ExecError::Backend(format!("output `{name}` is sealed"))),
                };
                Ok((name.clone(), value))
            })
            .collect()
    }

    /// Updates the profile's peaks: of live clear bytes (a scan of all slots) and of the
    /// process's resident memory, after step `node` (of profile key `key`).
    fn record_memory(&self, slots: &[Option<Value>], node: &str, key: &str, profile: &mut Profile) {
        if let Some(bytes) = peak_resident_bytes() {
            match &profile.rss_peak {
                None => profile.rss_peak = Some(RssPeak { bytes, grew_at: None }),
                Some(before) if bytes > before.bytes => profile.rss_peak = Some(RssPeak { bytes, grew_at: Some(format!("{node} ({key})")) }),
                Some(_) => {}
            }
        }
        let bytes_of = |v: &Option<Value>| match v {
            Some(Value::Clear(t)) => t.len() * t.dtype().size_of(),
            _ => 0,
        };
        let live: usize = slots.iter().map(bytes_of).sum();
        if live > profile.peak_live_bytes {
            profile.peak_live_bytes = live;
            let mut values: Vec<(String, usize)> = slots
                .iter()
                .enumerate()
                .map(|(slot, v)| (self.graph.node(self.slot_owner[slot]).name.clone(), bytes_of(v)))
                .filter(|(_, b)| *b > 0)
                .collect();
            values.sort_by_key(|v| std::cmp::Reverse(v.1));
            values.truncate(12);
            profile.peak_values = values;
        }
    }

    /// One stage of a server call, handed to the backend. Sealed values have one reader, so
    /// the stage takes them out of their slot.
    fn server_stage(&self, call: LinearCall, step: &Step, slots: &mut [Option<Value>], backend: Option<&dyn LinearBackend>) -> Result<Value, ExecError> {
        let backend = backend.ok_or_else(|| ExecError::NoBackend(format!("{} {}", call.layer, call.direction)))?;
        let slot = step.inputs[0];
        Ok(match call.stage {
            Stage::Seal => Value::Sealed(backend.seal(call, slots[slot].as_ref().expect("computed").clear()?)?),
            Stage::Apply | Stage::Open => {
                let Some(Value::Sealed(sealed)) = slots[slot].take() else {
                    return Err(ExecError::Backend(format!("{:?} stage of {} did not get a sealed value", call.stage, call.layer)));
                };
                match call.stage {
                    Stage::Apply => Value::Sealed(backend.apply(call, sealed)?),
                    _ => Value::Clear(Arc::new(backend.open(call, sealed)?)),
                }
            }
        })
    }
}

/// A model ready to run on inputs of any accepted shape; plans are made once per shape.
pub struct Model {
    graph: Graph,
    plans: Mutex<HashMap<Vec<(String, Vec<usize>)>, Arc<Plan>>>,
    /// Collects step times of every run while profiling is on.
    profile: Mutex<Option<Profile>>,
}

impl Model {
    pub fn new(graph: Graph) -> Model {
        Model { graph, plans: Mutex::new(HashMap::new()), profile: Mutex::new(None) }
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The plan for these input shapes, made on first use.
    pub fn plan(&self, shapes: &HashMap<String, Vec<usize>>) -> Result<Arc<Plan>, ExecError> {
        let mut key: Vec<(String, Vec<usize>)> = shapes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        key.sort();
        if let Some(plan) = self.plans.lock().unwrap().get(&key) {
            return Ok(plan.clone());
        }
        let plan = Arc::new(Plan::new(&self.graph, shapes)?);
        self.plans.lock().unwrap().insert(key, plan.clone());
        Ok(plan)
    }

    pub fn run(&self, inputs: HashMap<String, Tensor>) -> Result<Vec<(String, Tensor)>, ExecError> {
        self.run_with(inputs, None)
    }

    pub fn run_with(&self, inputs: HashMap<String, Tensor>, backend: Option<&dyn LinearBackend>) -> Result<Vec<(String, Tensor)>, ExecError> {
        let shapes = inputs.iter().map(|(k, v)| (k.clone(), v.shape().to_vec())).collect();
        let plan = self.plan(&shapes)?;
        let mut profile = self.profile.lock().unwrap().take();
        let result = plan.run_profiled(inputs, backend, profile.as_mut());
        if profile.is_some() {
            *self.profile.lock().unwrap() = profile;
        }
        result
    }

    /// Starts collecting step times (see [`Profile`]), or clears what was collected.
    pub fn start_profiling(&self) {
        *self.profile.lock().unwrap() = Some(Profile::default());
    }

    /// What was collected since `start_profiling`, and stops collecting.
    pub fn take_profile(&self) -> Option<Profile> {
        self.profile.lock().unwrap().take()
    }
}

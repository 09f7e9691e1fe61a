//! CPU topology and placement: which CPUs exist (hwloc2 for packages and cores; NUMA nodes
//! from sysfs, because hwloc2 2.2 panics when asked for NUMA objects by depth), and which of
//! them the workers get. A simulated topology makes multi-node placement testable anywhere.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One logical CPU (hardware thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    /// OS CPU number (what `sched_setaffinity` takes).
    pub os: usize,
    /// Physical core it belongs to (unique across packages).
    pub core: usize,
    /// Package (socket).
    pub package: usize,
    /// NUMA node.
    pub numa: usize,
}

/// The CPUs this process may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    cpus: Vec<Cpu>,
    source: &'static str,
}

/// Placement failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// A listed CPU does not exist or is not allowed for this process.
    #[error("core {cpu} does not exist here (available: {available})")]
    NoSuchCpu {
        /// The CPU asked for.
        cpu: usize,
        /// What exists.
        available: String,
    },
    /// More workers asked for than CPUs available.
    #[error("asked for {asked} cores but only {available} are available")]
    TooMany {
        /// Asked.
        asked: usize,
        /// Available.
        available: usize,
    },
    /// A CPU listed twice.
    #[error("core {0} is listed twice")]
    Duplicate(usize),
    /// Zero workers.
    #[error("at least one core is needed")]
    Empty,
    /// The core list did not parse.
    #[error("bad core list {0:?}: use `all`, a count like `2`, or a list like `0,2-3`")]
    Syntax(String),
}

/// Which CPUs to run workers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreSelection {
    /// Every available CPU.
    All,
    /// This many, spread over NUMA nodes and physical cores.
    Count(usize),
    /// Exactly these OS CPU numbers.
    List(Vec<usize>),
}

impl FromStr for CoreSelection {
    type Err = PlacementError;
    /// `all`, a count (`2`), or a list of CPUs and ranges (`0,2-3`; one CPU alone: `3-3` or
    /// `3,`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "all" {
            return Ok(Self::All);
        }
        if !s.contains(',') && !s.contains('-') {
            return s.parse().map(Self::Count).map_err(|_| PlacementError::Syntax(s.into()));
        }
        let mut list = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: usize = a.trim().parse().map_err(|_| PlacementError::Syntax(s.into()))?;
                    let b: usize = b.trim().parse().map_err(|_| PlacementError::Syntax(s.into()))?;
                    if a > b {
                        return Err(PlacementError::Syntax(s.into()));
                    }
                    list.extend(a..=b);
                }
                None => list.push(part.parse().map_err(|_| PlacementError::Syntax(s.into()))?),
            }
        }
        Ok(Self::List(list))
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cpus, {} cores, {} packages, {} NUMA nodes ({})",
            self.cpus.len(),
            self.cpus.iter().map(|c| c.core).collect::<BTreeSet<_>>().len(),
            self.cpus.iter().map(|c| c.package).collect::<BTreeSet<_>>().len(),
            self.numa_nodes().len(),
            self.source
        )
    }
}

/// Parses a sysfs CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(v) = part.parse() {
                    out.push(v);
                }
            }
        }
    }
    out
}

fn allowed_cpus() -> BTreeSet<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size matches the set passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return (0..num_cpus_online()).collect();
    }
    // SAFETY: CPU_ISSET reads the set we own, for indices within its size.
    (0..libc::CPU_SETSIZE as usize).filter(|&i| unsafe { libc::CPU_ISSET(i, &set) }).collect()
}

fn num_cpus_online() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// NUMA node of each CPU from /sys/devices/system/node (empty map if absent).
fn numa_from_sysfs() -> std::collections::HashMap<usize, usize> {
    let mut map = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") else { return map };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(node) = name.to_str().and_then(|n| n.strip_prefix("node")).and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if let Ok(list) = std::fs::read_to_string(entry.path().join("cpulist")) {
            for cpu in parse_cpu_list(&list) {
                map.insert(cpu, node);
            }
        }
    }
    map
}

impl Topology {
    /// Discovers the CPUs this process may use: hwloc2 for cores and packages (sysfs if hwloc
    /// is unavailable), sysfs NUMA nodes, restricted to the process's affinity mask.
    pub fn discover() -> Topology {
        let allowed = allowed_cpus();
        let numa = numa_from_sysfs();
        let (mut cpus, source) = match Self::from_hwloc(&numa) {
            Some(c) if !c.is_empty() => (c, "hwloc"),
            _ => (Self::from_sysfs(&numa), "sysfs"),
        };
        cpus.retain(|c| allowed.contains(&c.os));
        if cpus.is_empty() {
            cpus = allowed.iter().map(|&os| Cpu { os, core: os, package: 0, numa: 0 }).collect();
        }
        cpus.sort_by_key(|c| c.os);
        Topology { cpus, source }
    }

    fn from_hwloc(numa: &std::collections::HashMap<usize, usize>) -> Option<Vec<Cpu>> {
        use hwloc2::ObjectType;
        let topo = hwloc2::Topology::new()?;
        let pus = topo.objects_with_type(&ObjectType::PU).ok()?;
        let mut cpus = Vec::with_capacity(pus.len());
        for pu in pus {
            let os = pu.os_index() as usize;
            let mut core = None;
            let mut package = None;
            let mut node_from_set = None;
            let mut cur = pu.parent();
            while let Some(obj) = cur {
                match obj.object_type() {
                    ObjectType::Core if core.is_none() => core = Some(obj.logical_index() as usize),
                    ObjectType::Package if package.is_none() => package = Some(obj.logical_index() as usize),
                    _ => {}
                }
                cur = obj.parent();
            }
            if let Some(ns) = pu.nodeset() {
                let first = ns.first();
                if first >= 0 {
                    node_from_set = Some(first as usize);
                }
            }
            cpus.push(Cpu {
                os,
                core: core.unwrap_or(os),
                package: package.unwrap_or(0),
                numa: numa.get(&os).copied().or(node_from_set).unwrap_or(0),
            });
        }
        Some(cpus)
    }

    fn from_sysfs(numa: &std::collections::HashMap<usize, usize>) -> Vec<Cpu> {
        let online =
            std::fs::read_to_string("/sys/devices/system/cpu/online").map(|s| parse_cpu_list(&s)).unwrap_or_default();
        online
            .into_iter()
            .map(|os| {
                let read = |f: &str| {
                    std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{os}/topology/{f}"))
                        .ok()
                        .and_then(|s| s.trim().parse::<usize>().ok())
                };
                let package = read("physical_package_id").unwrap_or(0);
                let core = read("core_id").map(|c| package * 100_000 + c).unwrap_or(os);
                Cpu { os, core, package, numa: numa.get(&os).copied().unwrap_or(0) }
            })
            .collect()
    }

    /// A made-up topology: `nodes` NUMA nodes (one package each) of `cores_per_node` physical
    /// cores with `threads_per_core` hardware threads; CPUs numbered like Linux does (all first
    /// threads, then all second threads).
    pub fn simulated(nodes: usize, cores_per_node: usize, threads_per_core: usize) -> Topology {
        let cores = nodes * cores_per_node;
        let mut cpus = Vec::new();
        for t in 0..threads_per_core {
            for core in 0..cores {
                cpus.push(Cpu {
                    os: t * cores + core,
                    core,
                    package: core / cores_per_node,
                    numa: core / cores_per_node,
                });
            }
        }
        Topology { cpus, source: "simulated" }
    }

    /// Every CPU, in OS order.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }

    /// Where the topology came from (`hwloc`, `sysfs`, `simulated`).
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The NUMA nodes that have CPUs.
    pub fn numa_nodes(&self) -> Vec<usize> {
        self.cpus.iter().map(|c| c.numa).collect::<BTreeSet<_>>().into_iter().collect()
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self.cpus.iter().map(|c| c.os.to_string()).collect();
        v.join(",")
    }

    /// Chooses worker CPUs. A count is spread round-robin over NUMA nodes, and within a node
    /// over distinct physical cores before SMT siblings.
    pub fn select(&self, selection: &CoreSelection) -> Result<Vec<Cpu>, PlacementError> {
        match selection {
            CoreSelection::All => Ok(self.spread_order()),
            CoreSelection::Count(0) => Err(PlacementError::Empty),
            CoreSelection::Count(n) => {
                if *n > self.cpus.len() {
                    return Err(PlacementError::TooMany { asked: *n, available: self.cpus.len() });
                }
                Ok(self.spread_order().into_iter().take(*n).collect())
            }
            CoreSelection::List(list) => {
                if list.is_empty() {
                    return Err(PlacementError::Empty);
                }
                let mut seen = BTreeSet::new();
                list.iter()
                    .map(|&os| {
                        if !seen.insert(os) {
                            return Err(PlacementError::Duplicate(os));
                        }
                        self.cpus
                            .iter()
                            .find(|c| c.os == os)
                            .copied()
                            .ok_or_else(|| PlacementError::NoSuchCpu { cpu: os, available: self.describe() })
                    })
                    .collect()
            }
        }
    }

    /// All CPUs in spreading order: node 0's first core, node 1's first core, ..., then the
    /// next core of each node, with SMT siblings of already-used cores last.
    fn spread_order(&self) -> Vec<Cpu> {
        let nodes = self.numa_nodes();
        // Per node: first thread of each core, then the other threads.
        let mut per_node: Vec<std::collections::VecDeque<Cpu>> = nodes
            .iter()
            .map(|&n| {
                let mut firsts = Vec::new();
                let mut siblings = Vec::new();
                let mut seen_cores = BTreeSet::new();
                for c in self.cpus.iter().filter(|c| c.numa == n) {
                    if seen_cores.insert(c.core) {
                        firsts.push(*c);
                    } else {
                        siblings.push(*c);
                    }
                }
                firsts.into_iter().chain(siblings).collect()
            })
            .collect();
        let mut out = Vec::with_capacity(self.cpus.len());
        while out.len() < self.cpus.len() {
            for q in per_node.iter_mut() {
                if let Some(c) = q.pop_front() {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// The CPUs the calling thread may run on.
pub fn current_thread_affinity() -> Vec<usize> {
    allowed_cpus().into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_spreads_over_numa_nodes_before_filling_one() {
        let t = Topology::simulated(2, 4, 2);
        let picked = t.select(&CoreSelection::Count(4)).unwrap();
        let nodes: Vec<usize> = picked.iter().map(|c| c.numa).collect();
        assert_eq!(nodes, vec![0, 1, 0, 1]);
        // Distinct physical cores before any SMT sibling.
        let cores: BTreeSet<usize> = picked.iter().map(|c| c.core).collect();
        assert_eq!(cores.len(), 4);
    }

    #[test]
    fn smt_siblings_come_after_every_physical_core() {
        let t = Topology::simulated(2, 2, 2);
        let all = t.select(&CoreSelection::All).unwrap();
        let first_half: BTreeSet<usize> = all[..4].iter().map(|c| c.core).collect();
        assert_eq!(first_half.len(), 4, "first four picks are four distinct cores: {all:?}");
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn lists_and_ranges_parse_and_unknown_cpus_are_refused() {
        assert_eq!("0,2-3".parse::<CoreSelection>().unwrap(), CoreSelection::List(vec![0, 2, 3]));
        assert_eq!("3".parse::<CoreSelection>().unwrap(), CoreSelection::Count(3));
        assert_eq!("all".parse::<CoreSelection>().unwrap(), CoreSelection::All);
        assert!("x".parse::<CoreSelection>().is_err());
        let t = Topology::simulated(1, 2, 1);
        assert!(matches!(t.select(&CoreSelection::List(vec![5])), Err(PlacementError::NoSuchCpu { cpu: 5, .. })));
        assert!(matches!(t.select(&CoreSelection::List(vec![1, 1])), Err(PlacementError::Duplicate(1))));
        assert!(matches!(t.select(&CoreSelection::Count(3)), Err(PlacementError::TooMany { .. })));
    }

    #[test]
    fn discovery_finds_the_cpus_this_process_may_use() {
        let t = Topology::discover();
        let allowed = current_thread_affinity();
        assert_eq!(t.cpus().iter().map(|c| c.os).collect::<Vec<_>>(), allowed);
        assert!(!t.numa_nodes().is_empty());
    }
}

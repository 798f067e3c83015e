//! [`FakeKernel`]: the kernel seam over plain vectors, recording what it is asked to
//! change, so `tunnel`, `routes` and `mtu` are tested without a kernel.

use std::sync::Mutex;

use ipnet::Ipv4Net;

use super::{
    DefaultRoute, IPIP_DEVICE, KernelError, KernelRoute, L2Entry, LinkKind, LinkState, LinkSummary,
    LinkTable, MAIN_TABLE, ROUTE_PROTOCOL, RouteTable, RouteTarget, UplinkSource, VxlanParams,
};

/// A recording fake of one namespace's links, routes and L2 entries.
#[derive(Default)]
pub struct FakeKernel {
    pub routes: Mutex<Vec<KernelRoute>>,
    pub l2: Mutex<Vec<L2Entry>>,
    pub links: Mutex<Vec<LinkState>>,
    pub default_routes: Mutex<Vec<DefaultRoute>>,
    /// `replace_route` to this destination fails with `ENETUNREACH`.
    pub fail_dst: Option<Ipv4Net>,
    /// The errno `create_ipip_fallback` fails with; `None`: it creates `tunl0`.
    pub ipip_errno: Option<i32>,
    /// Every link change asked for, in order (lookups are not recorded).
    pub calls: Mutex<Vec<String>>,
}

impl FakeKernel {
    /// The link called `name`.
    pub fn get(&self, name: &str) -> Option<LinkState> {
        self.links
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.name == name)
            .cloned()
    }

    fn edit(&self, index: u32, f: impl FnOnce(&mut LinkState)) {
        let mut links = self.links.lock().unwrap();
        if let Some(l) = links.iter_mut().find(|l| l.index == index) {
            f(l);
        }
    }

    fn log(&self, c: String) {
        self.calls.lock().unwrap().push(c);
    }
}

impl RouteTable for FakeKernel {
    async fn routes(&self) -> Result<Vec<KernelRoute>, KernelError> {
        Ok(self.routes.lock().unwrap().clone())
    }
    async fn replace_route(&self, dst: Ipv4Net, t: &RouteTarget) -> Result<(), KernelError> {
        if self.fail_dst == Some(dst) {
            return Err(KernelError::refused("replace route", libc::ENETUNREACH));
        }
        let mut r = self.routes.lock().unwrap();
        r.retain(|k| !(k.dst == dst && k.table == MAIN_TABLE && k.priority == 0));
        r.push(KernelRoute {
            dst,
            protocol: ROUTE_PROTOCOL,
            table: MAIN_TABLE,
            priority: 0,
            target: t.clone(),
        });
        Ok(())
    }
    async fn delete_route(&self, route: &KernelRoute) -> Result<(), KernelError> {
        self.routes.lock().unwrap().retain(|k| k != route);
        Ok(())
    }
    async fn l2_entries(&self, _dev: &str) -> Result<Vec<L2Entry>, KernelError> {
        Ok(self.l2.lock().unwrap().clone())
    }
    async fn replace_l2(&self, e: &L2Entry) -> Result<(), KernelError> {
        self.l2.lock().unwrap().push(e.clone());
        Ok(())
    }
    async fn delete_l2(&self, e: &L2Entry) -> Result<(), KernelError> {
        self.l2.lock().unwrap().retain(|k| k != e);
        Ok(())
    }
}

impl LinkTable for FakeKernel {
    async fn link(&self, name: &str) -> Result<Option<LinkState>, KernelError> {
        Ok(self.get(name))
    }
    async fn create_ipip_fallback(&self) -> Result<(), KernelError> {
        self.log(format!("create {IPIP_DEVICE}"));
        if let Some(errno) = self.ipip_errno {
            return Err(KernelError::refused("create tunl0", errno));
        }
        self.links.lock().unwrap().push(LinkState {
            index: 7,
            name: IPIP_DEVICE.into(),
            kind: LinkKind::Ipip,
            mtu: 0,
            up: false,
            mac: None,
            ipv4: vec![],
        });
        Ok(())
    }
    async fn create_vxlan(
        &self,
        name: &str,
        params: &VxlanParams,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<(), KernelError> {
        self.log(format!("create {name}"));
        self.links.lock().unwrap().push(LinkState {
            index: 20,
            name: name.into(),
            kind: LinkKind::Vxlan(params.clone()),
            mtu,
            up: false,
            mac: Some(mac),
            ipv4: vec![],
        });
        Ok(())
    }
    async fn delete_link(&self, index: u32) -> Result<(), KernelError> {
        self.log(format!("delete link {index}"));
        self.links.lock().unwrap().retain(|l| l.index != index);
        Ok(())
    }
    async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), KernelError> {
        self.log(format!("set {index} mtu {mtu} up"));
        self.edit(index, |l| {
            l.mtu = mtu;
            l.up = true;
        });
        Ok(())
    }
    async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<(), KernelError> {
        self.log(format!("add {addr} to {index}"));
        self.edit(index, |l| l.ipv4.push(addr));
        Ok(())
    }
    async fn delete_address(&self, index: u32, addr: Ipv4Net) -> Result<(), KernelError> {
        self.log(format!("delete {addr} from {index}"));
        self.edit(index, |l| l.ipv4.retain(|a| *a != addr));
        Ok(())
    }
}

impl UplinkSource for FakeKernel {
    async fn link_summaries(&self) -> Result<Vec<LinkSummary>, KernelError> {
        Ok(self
            .links
            .lock()
            .unwrap()
            .iter()
            .map(|l| LinkSummary {
                index: l.index,
                name: l.name.clone(),
                mtu: l.mtu,
                ipv4: l.ipv4.iter().map(|n| n.addr()).collect(),
            })
            .collect())
    }
    async fn default_routes(&self) -> Result<Vec<DefaultRoute>, KernelError> {
        Ok(self.default_routes.lock().unwrap().clone())
    }
}

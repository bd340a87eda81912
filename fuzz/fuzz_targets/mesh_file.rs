//! The mesh file: any bytes either load into a model or give an error; a
//! model that loads answers destination, policy and mTLS questions for
//! every workload without panicking.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use mesh_core::model::MeshModel;
use mesh_core::policy::{authorize, mtls_mode, ConnInfo};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(model) = MeshModel::from_yaml(text, "fuzz") else {
        return;
    };
    for w in &model.workloads {
        let id = model.identity(w);
        for ip in &w.ips {
            for port in [80, 8080, 15008] {
                let _ = model.destination(SocketAddr::new(*ip, port));
                let _ = model.pick_endpoint(SocketAddr::new(*ip, port));
                let _ = mtls_mode(&model, w, port);
                let _ = authorize(
                    &model,
                    &ConnInfo {
                        source_identity: Some(&id),
                        source_ip: *ip,
                        destination: w,
                        destination_ip: *ip,
                        destination_port: port,
                    },
                );
            }
        }
    }
    for s in &model.services {
        let _ = model.service_waypoint(s);
        for v in &s.vips {
            for p in &s.ports {
                let _ = model.destination(SocketAddr::new(*v, p.port));
            }
        }
    }
    let _ = mesh_core::analyze::analyze(&model);
});

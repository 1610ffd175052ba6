// The dashboard: polls /v1/cluster for the topology and sessions, and chats through /v1/chat/completions.
const $ = (id) => document.getElementById(id);
const mib = (b) => ((b || 0) / 1048576).toFixed(1) + " MiB";
const colours = ["#2f6db5", "#c0572f", "#3c8f4a", "#8a4fb0", "#b08a2f", "#2f9fa0"];
const keyInput = $("key");
keyInput.value = localStorage.getItem("turbo-api-key") || "";
keyInput.onchange = () => localStorage.setItem("turbo-api-key", keyInput.value);
const headers = () => {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h.Authorization = "Bearer " + keyInput.value;
  return h;
};
const cell = (row, text) => { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); };
let messages = [];

async function refresh() {
  try {
    const r = await fetch("/v1/cluster", { headers: headers() });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const st = await r.json();
    $("error").textContent = "";
    $("model").textContent = st.model + " (" + st.num_layers + " layers)";
    $("rate").textContent = st.tokens_per_s + " tokens/s";
    $("queue").textContent = st.running + " running, " + st.queue_depth + " queued";
    const nodes = $("nodes").tBodies[0];
    nodes.innerHTML = "";
    for (const n of st.nodes) {
      const tr = nodes.insertRow();
      tr.className = "node";
      if (n.state !== "ready") { cell(tr, n.address); cell(tr, n.state + ": " + (n.error || "")); continue; }
      [n.name, n.address, n.backend, n.layers[0] + ":" + n.layers[1], mib(n.memory_used_bytes),
       mib(n.memory_free_bytes), n.sessions, mib(n.kv_bytes)].forEach((t) => cell(tr, t));
    }
    const plan = $("plan");
    plan.innerHTML = "";
    st.plan.forEach((p, i) => {
      const d = document.createElement("div");
      d.style.flex = p.layers[1] - p.layers[0];
      d.style.background = colours[i % colours.length];
      d.textContent = p.node + " " + p.layers[0] + ":" + p.layers[1];
      plan.appendChild(d);
    });
    const ss = $("sessions").tBodies[0];
    ss.innerHTML = "";
    for (const s of st.sessions) {
      const tr = ss.insertRow();
      tr.className = "session";
      [s.session_id, s.offset, mib(s.kv_bytes),
       s.stages.map((x) => x.node + " " + x.layers[0] + ":" + x.layers[1]).join(" → "),
       s.kept ? (s.busy ? "generating" : "kept") : "other"].forEach((t) => cell(tr, t));
    }
    $("nosessions").style.display = st.sessions.length ? "none" : "";
  } catch (e) {
    $("error").textContent = "status: " + e.message;
  }
}

function say(role, text) {
  const p = document.createElement("div");
  p.className = role;
  p.textContent = (role === "user" ? "you: " : "model: ") + text;
  $("log").appendChild(p);
  return p;
}

$("chat").onsubmit = async (ev) => {
  ev.preventDefault();
  const text = $("msg").value.trim();
  if (!text) return;
  $("msg").value = "";
  say("user", text);
  messages.push({ role: "user", content: text });
  const out = say("assistant", "");
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ messages, stream: true, max_tokens: 32, temperature: 0 }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, at).trim();
        buf = buf.slice(at + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        for (const c of ev.choices) answer += (c.delta && c.delta.content) || "";
        out.textContent = "model: " + answer;
      }
    }
    out.classList.add("done");
    messages.push({ role: "assistant", content: answer });
  } catch (e) {
    $("error").textContent = "chat: " + e.message;
  }
  refresh();
};

refresh();
setInterval(refresh, 2000);
